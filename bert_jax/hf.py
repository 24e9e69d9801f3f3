"""Hugging Face checkpoints in both directions: transformers' PyTorch layout <-> bert-jax.

One registry, `FAMILIES`, keyed by transformers' `model_type`, says for each family:

- how its config.json maps onto `EncoderConfig` (a table of (HF key, our field, HF default)
  plus the options that follow from the family, e.g. RoBERTa's position offset),
- how every weight maps onto our parameter tree (tables of `Rule`s: HF name template, our
  path template, and a conversion that is an exact inverse pair: transposes and reshapes,
  so import -> export gives back the same bits),
- which pretraining heads it has (`HeadGroup`s), which objective trains each (the module
  comes from that objective's `hf_head`), and which transformers class holds which.

An objective's second network that transformers holds as a model of its own (ELECTRA's
generator) is a `Tower` of that objective: `load_tower` / `export_from_workdir(tower=...)`
go through its `import_tower` / `export_tower`. An objective with no transformers head
exports its encoder alone (the family's base model).

Our parameter tree (what `load` returns and `export_state_dict` takes):

  {"encoder": ...,                                      the shared Encoder
   "mlm": {"head": MLMHead},                            MLM (tied embeddings + bias;
                                                        MobileBERT: + extra_output rows)
   "nsp" | "sop": {"pooler": {...}, "classifier": {...}}  PairHead (BERT NSP / ALBERT SOP)
   "rtd": {"discriminator_head": DiscriminatorHead},    ELECTRA discriminator (+ "generator",
                                                        "generator_head" for a pair:
                                                        load_electra_pair, the RTD tower)
   "pooler": {"dense": ...}}                            a pooler without a pair head

which is `PretrainModel`'s layout (params["mlm"]["head"], params["nsp"]["pooler"], ...).
Reading needs only numpy + safetensors (torch only for pytorch_model.bin); transformers is
never imported here except to write a tokenizer for our own sentencepiece models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import objectives
from bert_jax import heads
from bert_jax.encoder import NORMALIZATIONS, Encoder, EncoderConfig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- conversions

# name -> (HF tensor -> ours, ours -> HF tensor); each pair is an exact inverse.
Conversion = tuple[Callable[[np.ndarray, EncoderConfig], np.ndarray],
                   Callable[[np.ndarray, EncoderConfig], np.ndarray]]
CONVERSIONS: dict[str, Conversion] = {
    "copy": (lambda w, c: w, lambda a, c: a),
    # torch Linear [out, in] <-> flax Dense [in, out]
    "dense": (lambda w, c: w.T, lambda a, c: a.T),
    # query/key/value Linear [H, in] <-> DenseGeneral [in, heads, head_dim]
    "qkv": (lambda w, c: w.T.reshape(w.shape[1], w.shape[0] // c.head_dim, c.head_dim),
            lambda a, c: a.reshape(a.shape[0], -1).T),
    "qkv_bias": (lambda w, c: w.reshape(-1, c.head_dim), lambda a, c: a.reshape(-1)),
    # attention output Linear [H, in] <-> DenseGeneral [heads, head_dim, H]
    "attn_out": (lambda w, c: w.T.reshape(w.shape[1] // c.head_dim, c.head_dim, w.shape[0]),
                 lambda a, c: a.reshape(-1, a.shape[-1]).T),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One weight: HF name template, our path template ('/'-separated), conversion.

  `{i}` in both templates runs over our layer modules (ALBERT: the shared groups).
  `when`: the weight exists only for configs where it holds (e.g. MobileBERT's pooler).
  """

  hf: str
  ours: str
  conv: str = "copy"
  when: Callable[[EncoderConfig], bool] | None = None

  def expand(self, cfg: EncoderConfig) -> list["Rule"]:
    if self.when is not None and not self.when(cfg):
      return []
    if "{i}" not in self.hf:
      return [self]
    return [dataclasses.replace(self, hf=self.hf.format(i=i), ours=self.ours.format(i=i))
            for i in range(cfg.num_layer_groups or cfg.num_layers)]


def _linear(hf: str, ours: str, conv: str = "dense", bias_conv: str = "copy") -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{ours}/kernel", conv),
          Rule(f"{hf}.bias", f"{ours}/bias", bias_conv))


def _norm(hf: str, ours: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{ours}/norm/scale"), Rule(f"{hf}.bias", f"{ours}/norm/bias"))


def _attention_layer(hf_q: str, hf_k: str, hf_v: str, hf_o: str, hf_attn_norm: str,
                     hf_ffn_in: str, hf_ffn_out: str, hf_ffn_norm: str) -> tuple[Rule, ...]:
  """A post-LN transformer layer; HF templates may use {i}; ours is encoder/layer_{i}/..."""
  o = "layer_{i}"
  return (*_linear(hf_q, f"{o}/attention/query", "qkv", "qkv_bias"),
          *_linear(hf_k, f"{o}/attention/key", "qkv", "qkv_bias"),
          *_linear(hf_v, f"{o}/attention/value", "qkv", "qkv_bias"),
          *_linear(hf_o, f"{o}/attention/output", "attn_out"),
          *_norm(hf_attn_norm, f"{o}/attention_norm"),
          *_linear(hf_ffn_in, f"{o}/ffn/intermediate"),
          *_linear(hf_ffn_out, f"{o}/ffn/output"),
          *_norm(hf_ffn_norm, f"{o}/ffn_norm"))


BERT_LAYER = _attention_layer(
    "encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.key",
    "encoder.layer.{i}.attention.self.value", "encoder.layer.{i}.attention.output.dense",
    "encoder.layer.{i}.attention.output.LayerNorm", "encoder.layer.{i}.intermediate.dense",
    "encoder.layer.{i}.output.dense", "encoder.layer.{i}.output.LayerNorm")
ALBERT_LAYER = _attention_layer(*(
    f"encoder.albert_layer_groups.{{i}}.albert_layers.0.{n}" for n in (
        "attention.query", "attention.key", "attention.value", "attention.dense",
        "attention.LayerNorm", "ffn", "ffn_output", "full_layer_layer_norm")))
DISTILBERT_LAYER = _attention_layer(*(
    f"transformer.layer.{{i}}.{n}" for n in (
        "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
        "sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm")))

WORD = Rule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding")
POSITION = Rule("embeddings.position_embeddings.weight",
                "embeddings/position_embeddings/embedding")
TOKEN_TYPE = Rule("embeddings.token_type_embeddings.weight",
                  "embeddings/token_type_embeddings/embedding")
EMBED_NORM = _norm("embeddings.LayerNorm", "embeddings/layer_norm")


# --------------------------------------------------------------------------- heads


POOLER = "pooler"  # the head kind of a lone pooler (no objective trains it)


@dataclasses.dataclass(frozen=True)
class HeadGroup:
  """A pretraining head: its subtree `name` in our tree, the objective that trains it, its
  weights.

  `objective` names the registered objective whose `param_groups()` holds `name` and whose
  `hf_head` builds the module (None: the lone pooler). HF names here are full checkpoint
  keys (with the base-model prefix where the weight lives inside the base model, like
  BERT's pooler). The group is present in a checkpoint when its `detect` key is; then every
  one of its weights must be.
  """

  name: str
  objective: str | None
  rules: tuple[Rule, ...]
  detect: str

  @property
  def kind(self) -> str:
    """The module layout: the objective's `hf_head_kind` (PretrainingModel's groups)."""
    if self.objective is None:
      return POOLER
    kind = objectives.get(self.objective).hf_head_kind
    if kind is None:
      raise AssertionError(f"head group {self.name!r}: objective {self.objective!r} has no "
                           "transformers head (hf_head_kind)")
    return kind


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A transformers class and the head groups its checkpoint holds."""

  cls: str
  groups: tuple[str, ...]


def _mlm(transform: str, norm: str, bias: str, objective: str = "mlm") -> HeadGroup:
  """A masked-LM head (MLMHead) at params[<objective>]["head"]."""
  rules = (*_linear(transform, f"{objective}/head/transform"),
           *_norm(norm, f"{objective}/head/transform_norm"), Rule(bias, f"{objective}/head/bias"))
  return HeadGroup(objective, objective, rules, detect=f"{transform}.weight")


def _pair(objective: str, pooler: str, classifier: str) -> HeadGroup:
  """A pooler + 2-way classifier at params[<objective>]["pooler" | "classifier"]."""
  rules = (*_linear(pooler, f"{objective}/pooler/dense"),
           *_linear(classifier, f"{objective}/classifier/dense"))
  return HeadGroup(objective, objective, rules, detect=f"{classifier}.weight")


def _pooler(pooler: str) -> HeadGroup:
  return HeadGroup(POOLER, None, _linear(pooler, "pooler/dense"), detect=f"{pooler}.weight")


def _detector(objective: str, dense: str, prediction: str) -> HeadGroup:
  """A per-token discriminator (DiscriminatorHead) at params[<objective>]["discriminator_head"]."""
  rules = (*_linear(dense, f"{objective}/discriminator_head/dense"),
           *_linear(prediction, f"{objective}/discriminator_head/prediction"))
  return HeadGroup(objective, objective, rules, detect=f"{dense}.weight")


# --------------------------------------------------------------------------- families

# HF activation names -> ours (export inverts the first name found for ours).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}

# (HF config key, EncoderConfig field, HF default when the key is absent)
BERT_CONFIG = (
    ("vocab_size", "vocab_size", 30522),
    ("hidden_size", "hidden_size", 768),
    ("num_hidden_layers", "num_layers", 12),
    ("num_attention_heads", "num_heads", 12),
    ("intermediate_size", "intermediate_size", 3072),
    ("max_position_embeddings", "max_position_embeddings", 512),
    ("type_vocab_size", "type_vocab_size", 2),
    ("hidden_act", "hidden_act", "gelu"),
    ("hidden_dropout_prob", "hidden_dropout", 0.1),
    ("attention_probs_dropout_prob", "attention_dropout", 0.1),
    ("layer_norm_eps", "layer_norm_eps", 1e-12),
    ("initializer_range", "initializer_range", 0.02),
)


def _with_defaults(table, **defaults):
  return tuple((k, f, defaults.get(k, d)) for k, f, d in table)


ELECTRA_CONFIG = BERT_CONFIG + (("embedding_size", "embedding_size", 128),)
ALBERT_CONFIG = _with_defaults(
    BERT_CONFIG, vocab_size=30000, hidden_size=4096, num_attention_heads=64,
    intermediate_size=16384, hidden_act="gelu_new", hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0) + (
        ("embedding_size", "embedding_size", 128),
        ("num_hidden_groups", "num_layer_groups", 1))
DISTILBERT_CONFIG = (
    ("vocab_size", "vocab_size", 30522),
    ("dim", "hidden_size", 768),
    ("n_layers", "num_layers", 6),
    ("n_heads", "num_heads", 12),
    ("hidden_dim", "intermediate_size", 3072),
    ("max_position_embeddings", "max_position_embeddings", 512),
    ("activation", "hidden_act", "gelu"),
    ("dropout", "hidden_dropout", 0.1),
    ("attention_dropout", "attention_dropout", 0.1),
    ("initializer_range", "initializer_range", 0.02),
)
MOBILEBERT_CONFIG = _with_defaults(
    BERT_CONFIG, hidden_size=512, num_hidden_layers=24, num_attention_heads=4,
    intermediate_size=512, hidden_act="relu", hidden_dropout_prob=0.0) + (
        ("embedding_size", "embedding_size", 128),
        ("intra_bottleneck_size", "intra_bottleneck_size", 128),
        ("use_bottleneck_attention", "use_bottleneck_attention", False),
        ("key_query_shared_bottleneck", "key_query_shared_bottleneck", True),
        ("num_feedforward_networks", "num_feedforward_networks", 4),
        ("normalization_type", "normalization", "no_norm"),
        ("trigram_input", "trigram_input", True),
        ("classifier_activation", "pooler_activation", True))
# transformers' MobileBertEmbeddings and MobileBertOutput build their LayerNorms without an
# eps: torch's default.
MOBILEBERT_BLOCK_NORM_EPS = 1e-5


class UnsupportedError(ValueError):
  """A checkpoint or config that this module cannot map exactly."""


def _require(hf: Mapping[str, Any], key: str, allowed: tuple, default: Any, family: str) -> None:
  value = hf.get(key, default)
  if value not in allowed:
    raise UnsupportedError(f"{family}: {key}={value!r} is not supported (only {allowed})")


def _bert_options(hf, fields):
  _require(hf, "position_embedding_type", ("absolute",), "absolute", "bert")
  return fields


def _roberta_options(hf, fields):
  _require(hf, "position_embedding_type", ("absolute",), "absolute", "roberta")
  pad = hf.get("pad_token_id", 1)
  # HF counts positions from padding_idx + 1; padding tokens sit at padding_idx.
  fields["position_offset"] = pad + 1
  if fields["hidden_act"] != "gelu":
    fields["head_act"] = "gelu"  # RobertaLMHead always applies GELU
  return fields


def _electra_options(hf, fields):
  _require(hf, "position_embedding_type", ("absolute",), "absolute", "electra")
  if fields["embedding_size"] == fields["hidden_size"]:
    fields["embedding_size"] = None  # no embeddings_project
  if fields["hidden_act"] != "gelu":
    fields["head_act"] = "gelu"  # ElectraGeneratorPredictions always applies GELU
  return fields


def _albert_options(hf, fields):
  _require(hf, "inner_group_num", (1,), 1, "albert")
  _require(hf, "position_embedding_type", ("absolute",), "absolute", "albert")
  if fields["embedding_size"] == fields["hidden_size"]:
    raise UnsupportedError("albert: embedding_size == hidden_size (ALBERT keeps its "
                           "embedding_hidden_mapping_in then; our encoder drops it)")
  if fields["num_layers"] % fields["num_layer_groups"]:
    raise UnsupportedError(f"albert: num_hidden_groups={fields['num_layer_groups']} must "
                           f"divide num_hidden_layers={fields['num_layers']}")
  return fields


def _distilbert_options(hf, fields):
  fields["type_vocab_size"] = 0
  fields["layer_norm_eps"] = 1e-12  # fixed in transformers' DistilBERT
  return fields


def _mobilebert_options(hf, fields):
  _require(hf, "normalization_type", NORMALIZATIONS, "no_norm", "mobilebert")
  if not hf.get("use_bottleneck", True):  # transformers then ignores the bottleneck options
    fields.update(intra_bottleneck_size=None, use_bottleneck_attention=False,
                  key_query_shared_bottleneck=False)
  elif fields["use_bottleneck_attention"]:
    # transformers still builds the key/query bottleneck but never uses it: not imported.
    fields["key_query_shared_bottleneck"] = False
  elif (not fields["key_query_shared_bottleneck"]
        and fields["intra_bottleneck_size"] != fields["hidden_size"]):
    raise UnsupportedError(
        "mobilebert: with neither use_bottleneck_attention nor key_query_shared_bottleneck, "
        f"intra_bottleneck_size={fields['intra_bottleneck_size']} must equal hidden_size="
        f"{fields['hidden_size']} (transformers' query projection takes the bottleneck width)")
  fields["project_word_embeddings"] = True
  if fields["normalization"] == "layer_norm":
    fields["block_norm_eps"] = MOBILEBERT_BLOCK_NORM_EPS
  return fields


def _mobilebert_rules(cfg):
  layer = "encoder.layer.{i}."
  proj = (_linear("embeddings.embedding_transformation", "embeddings/projection")
          if cfg.embedding_projection else ())
  names = ()
  if cfg.intra_bottleneck_size is not None:
    names = (("bottleneck.input", "bottleneck_input"), ("output.bottleneck", "bottleneck_output"),
             *((("bottleneck.attention", "bottleneck_attention"),)
               if cfg.key_query_shared_bottleneck else ()))
  bottleneck = tuple(r for h, o in names for r in (
      *_linear(f"{layer}{h}.dense", f"layer_{{i}}/{o}"),
      *_norm(f"{layer}{h}.LayerNorm", f"layer_{{i}}/{o}_norm")))
  stack = tuple(r for j in range(cfg.num_feedforward_networks - 1) for r in (
      *_linear(f"{layer}ffn.{j}.intermediate.dense", f"layer_{{i}}/ffn_stack_{j}/intermediate"),
      *_linear(f"{layer}ffn.{j}.output.dense", f"layer_{{i}}/ffn_stack_{j}/output"),
      *_norm(f"{layer}ffn.{j}.output.LayerNorm", f"layer_{{i}}/ffn_stack_norm_{j}")))
  return (WORD, POSITION, TOKEN_TYPE, *EMBED_NORM, *proj, *BERT_LAYER, *bottleneck, *stack)


# MobileBERT's MLM output rows beyond the embedding width.
_MOBILEBERT_EXTRA = Rule("cls.predictions.dense.weight", "mlm/head/extra_output",
                         when=lambda c: c.hidden_size > c.embed_size)


def _mobilebert_groups() -> tuple[HeadGroup, ...]:
  """MLM with its extra output rows (hidden_size > embedding_size), NSP, pooler; the pooler's
  dense exists only with classifier_activation (pooler_activation)."""
  def pooler_if_activated(group):
    return dataclasses.replace(group, rules=tuple(
        dataclasses.replace(r, when=lambda c: c.pooler_activation) if "pooler/" in r.ours else r
        for r in group.rules))

  mlm = _mlm("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             "cls.predictions.bias")
  return (dataclasses.replace(mlm, rules=mlm.rules + (_MOBILEBERT_EXTRA,)),
          pooler_if_activated(_pair("nsp", "mobilebert.pooler.dense", "cls.seq_relationship")),
          pooler_if_activated(_pooler("mobilebert.pooler.dense")))


def _mobilebert_fixup(cfg, hf_config, state, arch) -> None:
  """The config keys derived from ours, and zeros for the weights transformers builds but
  does not use with this config (so that it loads the directory with nothing missing)."""
  hf_config.update(use_bottleneck=cfg.intra_bottleneck_size is not None,
                   true_hidden_size=cfg.inner_size)
  prefix = "" if arch.cls == "MobileBertModel" else "mobilebert."
  word = state[prefix + WORD.hf]
  if not cfg.embedding_projection:
    state[prefix + "embeddings.embedding_transformation.weight"] = np.zeros(
        (cfg.hidden_size, cfg.embed_size), word.dtype)
    state[prefix + "embeddings.embedding_transformation.bias"] = np.zeros(
        (cfg.hidden_size,), word.dtype)
  family = get_family("mobilebert")
  has_extra = any(_MOBILEBERT_EXTRA in family.group(g).rules for g in arch.groups)
  if has_extra and cfg.hidden_size == cfg.embed_size:  # transformers builds it empty
    state[_MOBILEBERT_EXTRA.hf] = np.zeros((0, cfg.vocab_size), word.dtype)


def _electra_rules(cfg):
  # embedding_size == hidden_size (ELECTRA-Base, or a generator as wide as the tables): no
  # embeddings_project in either framework.
  proj = (_linear("embeddings_project", "embeddings/projection")
          if cfg.embed_size != cfg.hidden_size else ())
  return (WORD, POSITION, TOKEN_TYPE, *EMBED_NORM, *proj, *BERT_LAYER)


@dataclasses.dataclass(frozen=True)
class Family:
  """How one transformers model family maps onto the shared encoder and our heads."""

  model_type: str
  prefix: str  # the base model's attribute in *ForPreTraining, e.g. "bert."
  config_table: tuple[tuple[str, str, Any], ...]
  options: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]]
  encoder_rules: Callable[[EncoderConfig], tuple[Rule, ...]]
  groups: tuple[HeadGroup, ...]
  architectures: tuple[Architecture, ...]  # preferred first; the last is the base model
  # Checkpoint keys that are aliases of tied weights, never needed by us.
  tied_aliases: tuple[str, ...] = ()
  # Extra HF config keys written on export of our own checkpoints.
  export_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Which head group holds the pooler when the base model is exported.
  pair_group: str | None = None
  # (ok(cfg), message) pairs: what an EncoderConfig needs to be written as this family.
  export_checks: tuple[tuple[Callable[[EncoderConfig], bool], str], ...] = ()
  # (cfg, HF config, HF state dict, architecture) -> None: last in-place adjustments.
  export_fixup: Callable[..., None] | None = None

  def group(self, name: str) -> HeadGroup:
    return next(g for g in self.groups if g.name == name)


# (ok(cfg), message formatted with c=cfg): what export needs.
COMMON_CHECKS = (
    (lambda c: not c.pre_layer_norm, "pre_layer_norm=True has no transformers equivalent"),
    (lambda c: c.hidden_act in TO_HF_ACTIVATIONS, "hidden_act={c.hidden_act!r}"),
)
NO_SHARING = ((lambda c: c.num_layer_groups in (None, c.num_layers),
               "num_layer_groups={c.num_layer_groups} (only ALBERT shares layers)"),)
NOT_FACTORIZED = ((lambda c: c.embedding_size in (None, c.hidden_size),
                   "embedding_size={c.embedding_size} (only ELECTRA and ALBERT factorize)"),)
TOKEN_TYPES = ((lambda c: c.type_vocab_size > 0, "type_vocab_size=0 (the family has token "
                "types)"),)
POSITIONS_FROM_ZERO = ((lambda c: c.position_offset == 0,
                        "position_offset={c.position_offset} (only RoBERTa offsets positions)"),)
HEAD_ACT_IS_HIDDEN = ((lambda c: c.head_act in (None, c.hidden_act),
                       "head_act={c.head_act!r} (the family's MLM head uses hidden_act)"),)
HEAD_ACT_IS_GELU = ((lambda c: (c.head_act or c.hidden_act) == "gelu",
                     "MLM head activation {c.head_act!r} (the family's head is always GELU)"),)
NOT_MOBILEBERT = ((lambda c: (c.intra_bottleneck_size, c.num_feedforward_networks,
                              c.normalization, c.project_word_embeddings, c.pooler_activation,
                              c.block_norm_eps in (None, c.layer_norm_eps))
                   == (None, 1, "layer_norm", False, True, True),
                   "MobileBERT options (intra_bottleneck_size, num_feedforward_networks, "
                   "normalization, project_word_embeddings, trigram_input, block_norm_eps, "
                   "pooler_activation) export only as mobilebert"),)
MOBILEBERT_CHECKS = (
    (lambda c: c.project_word_embeddings, "project_word_embeddings=False (MobileBERT projects "
     "the word vectors before adding positions)"),
    (lambda c: c.normalization == "no_norm" or MOBILEBERT_BLOCK_NORM_EPS == (
        c.layer_norm_eps if c.block_norm_eps is None else c.block_norm_eps),
     "block_norm_eps={c.block_norm_eps} with layer_norm_eps={c.layer_norm_eps} (transformers' "
     "MobileBERT has 1e-5 in its embedding and FFN-output LayerNorms)"),
    (lambda c: c.intra_bottleneck_size in (None, c.hidden_size) or c.use_bottleneck_attention
     or c.key_query_shared_bottleneck, "intra_bottleneck_size={c.intra_bottleneck_size} != "
     "hidden_size with queries and keys from the layer input (transformers' query projection "
     "takes the bottleneck width)"),
)


def _roberta_fixup(cfg, hf_config, state, arch) -> None:
  """HF counts positions from pad_token_id + 1 and puts padding at pad_token_id. Ours from
  0 (the roberta preset) are shifted by pad + 1 rows (zeros below: padding only)."""
  del arch
  pad = hf_config.setdefault("pad_token_id", 1)
  if cfg.position_offset == pad + 1:
    return
  if cfg.position_offset != 0:
    raise UnsupportedError(f"cannot export to roberta: position_offset={cfg.position_offset} "
                           f"but pad_token_id={pad} (HF counts positions from pad + 1)")
  hf_config["max_position_embeddings"] = cfg.max_position_embeddings + pad + 1
  key = next(k for k in state if k.endswith(POSITION.hf))
  table = state[key]
  state[key] = np.concatenate([np.zeros((pad + 1, table.shape[1]), table.dtype), table])


def _bert_like_rules(cfg):
  types = (TOKEN_TYPE,) if cfg.type_vocab_size > 0 else ()
  return (WORD, POSITION, *types, *EMBED_NORM, *BERT_LAYER)


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "bert", "bert.", BERT_CONFIG, _bert_options, _bert_like_rules,
        groups=(_mlm("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                     "cls.predictions.bias"),
                _pair("nsp", "bert.pooler.dense", "cls.seq_relationship"),
                _pooler("bert.pooler.dense")),
        architectures=(Architecture("BertForPreTraining", ("mlm", "nsp")),
                       Architecture("BertForMaskedLM", ("mlm",)),
                       Architecture("BertModel", ("pooler",))),
        tied_aliases=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
        export_defaults={"pad_token_id": 0, "position_embedding_type": "absolute"},
        pair_group="nsp",
        export_checks=NO_SHARING + NOT_FACTORIZED + TOKEN_TYPES + POSITIONS_FROM_ZERO
        + HEAD_ACT_IS_HIDDEN + NOT_MOBILEBERT),
    "roberta": Family(
        "roberta", "roberta.", _with_defaults(BERT_CONFIG, layer_norm_eps=1e-12),
        _roberta_options, _bert_like_rules,
        groups=(_mlm("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
                _pooler("roberta.pooler.dense")),
        architectures=(Architecture("RobertaForMaskedLM", ("mlm",)),
                       Architecture("RobertaModel", ("pooler",))),
        tied_aliases=("lm_head.decoder.weight", "lm_head.decoder.bias"),
        export_defaults={"position_embedding_type": "absolute"},
        export_checks=NO_SHARING + NOT_FACTORIZED + TOKEN_TYPES + HEAD_ACT_IS_GELU
        + NOT_MOBILEBERT,
        export_fixup=_roberta_fixup),
    "electra": Family(
        "electra", "electra.", ELECTRA_CONFIG, _electra_options, _electra_rules,
        groups=(_detector("rtd", "discriminator_predictions.dense",
                          "discriminator_predictions.dense_prediction"),
                _mlm("generator_predictions.dense", "generator_predictions.LayerNorm",
                     "generator_lm_head.bias")),
        architectures=(Architecture("ElectraForPreTraining", ("rtd",)),
                       Architecture("ElectraForMaskedLM", ("mlm",)),
                       Architecture("ElectraModel", ())),
        tied_aliases=("generator_lm_head.weight",),
        export_defaults={"pad_token_id": 0, "position_embedding_type": "absolute"},
        export_checks=NO_SHARING + TOKEN_TYPES + POSITIONS_FROM_ZERO + HEAD_ACT_IS_GELU
        + NOT_MOBILEBERT),
    "albert": Family(
        "albert", "albert.", ALBERT_CONFIG, _albert_options,
        lambda cfg: (WORD, POSITION, TOKEN_TYPE, *EMBED_NORM,
                     *_linear("encoder.embedding_hidden_mapping_in", "embeddings/projection"),
                     *ALBERT_LAYER),
        groups=(_mlm("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
                _pair("sop", "albert.pooler", "sop_classifier.classifier"),
                _pooler("albert.pooler")),
        architectures=(Architecture("AlbertForPreTraining", ("mlm", "sop")),
                       Architecture("AlbertForMaskedLM", ("mlm",)),
                       Architecture("AlbertModel", ("pooler",))),
        tied_aliases=("predictions.decoder.weight", "predictions.decoder.bias"),
        export_defaults={"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
                         "inner_group_num": 1, "position_embedding_type": "absolute",
                         "classifier_dropout_prob": 0.1},
        pair_group="sop",
        export_checks=TOKEN_TYPES + POSITIONS_FROM_ZERO + HEAD_ACT_IS_HIDDEN + NOT_MOBILEBERT + (
            (lambda c: c.embedding_size not in (None, c.hidden_size),
             "embedding_size={c.embedding_size} (ALBERT projects a narrower embedding)"),)),
    "distilbert": Family(
        "distilbert", "distilbert.", DISTILBERT_CONFIG, _distilbert_options,
        lambda cfg: (WORD, POSITION, *EMBED_NORM, *DISTILBERT_LAYER),
        groups=(_mlm("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),),
        architectures=(Architecture("DistilBertForMaskedLM", ("mlm",)),
                       Architecture("DistilBertModel", ())),
        tied_aliases=("vocab_projector.weight",),
        export_defaults={"pad_token_id": 0, "sinusoidal_pos_embds": False},
        export_checks=NO_SHARING + NOT_FACTORIZED + POSITIONS_FROM_ZERO + HEAD_ACT_IS_HIDDEN
        + NOT_MOBILEBERT + (
            (lambda c: c.type_vocab_size == 0, "type_vocab_size={c.type_vocab_size} "
             "(DistilBERT has no token types)"),
            (lambda c: c.layer_norm_eps == 1e-12, "layer_norm_eps={c.layer_norm_eps} "
             "(DistilBERT's is fixed at 1e-12)"))),
    "mobilebert": Family(
        "mobilebert", "mobilebert.", MOBILEBERT_CONFIG, _mobilebert_options, _mobilebert_rules,
        groups=_mobilebert_groups(),
        architectures=(Architecture("MobileBertForPreTraining", ("mlm", "nsp")),
                       Architecture("MobileBertForMaskedLM", ("mlm",)),
                       Architecture("MobileBertModel", ("pooler",))),
        tied_aliases=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
        export_defaults={"pad_token_id": 0},
        pair_group="nsp",
        export_checks=NO_SHARING + TOKEN_TYPES + POSITIONS_FROM_ZERO + HEAD_ACT_IS_HIDDEN
        + MOBILEBERT_CHECKS,
        export_fixup=_mobilebert_fixup),
}

# Buffers some checkpoints carry (position ids); never weights.
IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")


# Families whose import/export lives in a module of its own (different attention).
SEPARATE_FAMILIES = {"xlnet": "bert_jax.hf_xlnet"}


def _separate(model_type: str | None):
  import importlib
  name = SEPARATE_FAMILIES.get(model_type or "")
  return importlib.import_module(name) if name else None


def supported_model_types() -> list[str]:
  return sorted(set(FAMILIES) | set(SEPARATE_FAMILIES))


def get_family(model_type: str | None) -> Family:
  if model_type not in FAMILIES:
    raise UnsupportedError(f"unsupported model_type {model_type!r}; supported: "
                           f"{', '.join(supported_model_types())}")
  return FAMILIES[model_type]


# --------------------------------------------------------------------------- configs


def encoder_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> EncoderConfig:
  """config.json (as a dict) -> EncoderConfig; `overrides` e.g. dtype, attention_impl."""
  family = get_family(hf.get("model_type"))
  fields = {f: hf.get(k, d) for k, f, d in family.config_table}
  act = fields["hidden_act"]
  if act not in HF_ACTIVATIONS:
    raise UnsupportedError(f"{family.model_type}: hidden activation {act!r} is not supported "
                           f"(supported: {sorted(HF_ACTIVATIONS)})")
  fields["hidden_act"] = HF_ACTIVATIONS[act]
  fields = family.options(hf, fields)
  fields.update(overrides)
  return EncoderConfig(**fields)


# Our fields whose HF value is not the field itself.
FIELD_TO_HF: dict[str, Callable[[EncoderConfig], Any]] = {
    "hidden_act": lambda c: TO_HF_ACTIVATIONS[c.hidden_act],
    "embedding_size": lambda c: c.embed_size,
    "num_layer_groups": lambda c: c.num_layer_groups or c.num_layers,
    "intra_bottleneck_size": lambda c: c.inner_size,  # unused by transformers without one
}


def hf_config_from_encoder(family: Family, cfg: EncoderConfig, architecture: str,
                           base: Mapping[str, Any] | None = None,
                           special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """EncoderConfig -> config.json dict. `base` (the imported checkpoint's config) keeps the
  keys we do not model; `special_ids` (pad/bos/eos/...) come from our tokenizer."""
  _check_exportable(family, cfg)
  out = dict(family.export_defaults)
  out.update(base or {})
  for k, f, _ in family.config_table:
    out[k] = FIELD_TO_HF.get(f, lambda c, f=f: getattr(c, f))(cfg)
  if special_ids:
    out.update({k: v for k, v in special_ids.items() if not base or k not in base})
  out["model_type"] = family.model_type
  out["architectures"] = [architecture]
  out.setdefault("tie_word_embeddings", True)
  return out


def _check_exportable(family: Family, cfg: EncoderConfig) -> None:
  wrong = [msg.format(c=cfg) for ok, msg in COMMON_CHECKS + family.export_checks if not ok(cfg)]
  if wrong:
    raise UnsupportedError(f"cannot export to {family.model_type}: {'; '.join(wrong)}")


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, {name: float32/int numpy array}) from a transformers directory."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path!r} is not a transformers model directory (no config.json)")
  with open(cfg_path) as f:
    hf_config = json.load(f)
  files = _weight_files(path)
  state: dict[str, np.ndarray] = {}
  for file in files:
    state.update(_read_weights(file))
  return hf_config, {k: _as_float32(v) for k, v in state.items()}


def _weight_files(path: str) -> list[str]:
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    p = os.path.join(path, index)
    if os.path.isfile(p):
      with open(p) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(path, n) for n in names]
  for name in ("model.safetensors", "pytorch_model.bin"):
    p = os.path.join(path, name)
    if os.path.isfile(p):
      return [p]
  raise FileNotFoundError(f"no weights in {path!r} (looked for model.safetensors, "
                          "pytorch_model.bin and their sharded .index.json forms)")


def _read_weights(file: str) -> dict[str, np.ndarray]:
  if file.endswith(".safetensors"):
    from safetensors import safe_open
    out = {}
    with safe_open(file, framework="numpy") as f:
      for k in f.keys():
        try:
          out[k] = f.get_tensor(k)
        except (TypeError, ValueError):  # bfloat16: numpy has no such dtype
          with safe_open(file, framework="flax") as g:
            out[k] = np.asarray(g.get_tensor(k).astype(jnp.float32))
    return out
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {file} needs torch (or convert it to model.safetensors)") from e
  sd = torch.load(file, map_location="cpu", weights_only=True)
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in sd.items()}


def _as_float32(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


# --------------------------------------------------------------------------- model


def _head_objective(kind: str) -> type[objectives.Objective]:
  """The registered objective whose `hf_head` builds the transformers head `kind`."""
  for name in objectives.available():
    if objectives.get(name).hf_head_kind == kind:
      return objectives.get(name)
  raise ValueError(f"unknown head kind {kind!r}")


class PretrainingModel(nn.Module):
  """The encoder plus the given head groups, applied at every position.

  Returns {"hidden_states", "all_hidden_states", per group its head's logits (MLM:
  vocabulary logits [B, L, V], pair: [B, 2], RTD: per-token [B, L]), and "pooled" (the
  pooler's output, from a pair head's pooler or the lone pooler)}. Each group's module is
  the `hf_head` of the objective that declares its kind.
  """

  cfg: EncoderConfig
  groups: tuple[tuple[str, str], ...]  # (name, kind)

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, attention_mask=None, *,
               deterministic: bool = True):
    encoder = Encoder(self.cfg, name="encoder")
    out = dict(encoder(input_ids, segment_ids, attention_mask, deterministic=deterministic,
                       output_hidden_states=True))
    h = out["hidden_states"]
    for name, kind in self.groups:
      if kind == POOLER:
        out["pooled"] = heads.Pooler(self.cfg, name=name)(h)
        continue
      res = dict(_head_objective(kind).hf_head(self.cfg, name)(
          h, encoder, deterministic=deterministic))
      out[name] = res.pop("logits")
      out.update(res)
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def abstract_params(cfg: EncoderConfig, groups: tuple[tuple[str, str], ...]) -> dict[str, Any]:
  """{path: ShapeDtypeStruct} of PretrainingModel(cfg, groups)'s parameters."""
  model = PretrainingModel(cfg, groups)
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids, ids + 1))
  return _flatten(nn.meta.unbox(shapes["params"]))


# --------------------------------------------------------------------------- import


@dataclasses.dataclass
class Imported:
  """What `load` returns: the full parameter tree and what it came from."""

  family: str
  config: EncoderConfig
  params: dict[str, Any]  # {"encoder": ..., "mlm": ..., "nsp"/"sop"/"rtd"/"pooler": ...}
  hf_config: dict[str, Any]
  groups: tuple[str, ...]  # head groups found, e.g. ("mlm", "nsp")
  architecture: str | None
  ignored: tuple[str, ...] = ()  # checkpoint weights with no place in our tree
  objective_names: tuple[str, ...] = ()  # the objectives that train those heads
  # Towers imported beside (load_tower): {tower: the objective's facts about it (ELECTRA's
  # generator: "generator_size", "generator_layers" (None: the discriminator's depth),
  # "config"), and its "hf_config"}.
  towers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  # {objective: {field: value}}: config.<objective> values the checkpoint implies
  # (run_config_for sets them).
  sections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> PretrainingModel:
    family = get_family(self.family)
    return PretrainingModel(self.config, tuple((g, family.group(g).kind) for g in self.groups))

  @property
  def objectives(self) -> str:
    """The objectives string these heads serve, e.g. "mlm:1.0,nsp:1.0"."""
    return ",".join(f"{n}:1.0" for n in self.objective_names)

  @property
  def generator(self) -> dict[str, Any] | None:
    """An ELECTRA pair's generator tower (towers["generator"]; load_electra_pair)."""
    return self.towers.get(GENERATOR)


def _normalize_keys(family: Family, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Base-model checkpoints (AutoModel.save_pretrained) have no prefix: add it."""
  if any(k.startswith(family.prefix) for k in state):
    return state
  return {family.prefix + k: v for k, v in state.items()}


def load(path: str, **config_overrides: Any) -> Imported:
  """Reads a transformers directory into our full pretraining parameter tree."""
  hf_config, state = read_checkpoint(path)
  separate = _separate(hf_config.get("model_type"))
  if separate is not None:
    return separate.load(path, **config_overrides)
  family = get_family(hf_config.get("model_type"))
  cfg = encoder_config_from_hf(hf_config, **config_overrides)
  state = _normalize_keys(family, state)
  used: set[str] = set()
  flat: dict[str, np.ndarray] = {}
  origin: dict[str, Rule] = {}  # our path -> the rule (with the full HF key) it came from

  def take(rules, hf_prefix="", ours_prefix=""):
    for rule in (r for rule in rules for r in rule.expand(cfg)):
      key, ours = hf_prefix + rule.hf, ours_prefix + rule.ours
      if key not in state:
        raise KeyError(f"{family.model_type} checkpoint {path!r} lacks weight {key!r} "
                       f"(needed for our {ours!r})")
      flat[ours] = np.ascontiguousarray(CONVERSIONS[rule.conv][0](state[key], cfg))
      origin[ours] = Rule(key, ours, rule.conv)
      used.add(key)

  take(family.encoder_rules(cfg), family.prefix, "encoder/")
  groups = []
  for group in family.groups:
    if group.detect in state and group.detect not in used:
      take(group.rules)
      groups.append(group.name)
  groups_kinds = tuple((g, family.group(g).kind) for g in groups)
  _check_shapes(flat, abstract_params(cfg, groups_kinds), origin, family, cfg)
  _check_tied(family, state, flat)
  ignored = tuple(sorted(k for k in set(state) - used
                         if k not in family.tied_aliases and not IGNORED.search(k)))
  if ignored:
    log.warning("%s: ignoring %d weights with no place in bert-jax: %s", path, len(ignored),
                ", ".join(ignored[:10]))
  arch = next((a.cls for a in family.architectures if set(a.groups) == set(groups)), None)
  trained_by = tuple(dict.fromkeys(family.group(g).objective for g in groups
                                   if family.group(g).objective is not None))
  return Imported(family.model_type, cfg, _unflatten(flat), hf_config, tuple(groups),
                  (hf_config.get("architectures") or [arch])[0], ignored, trained_by)


def _check_shapes(flat, expected, origin, family, cfg):
  missing = sorted(set(expected) - set(flat))
  if missing:  # a mapping table out of step with the modules: our bug, not the user's
    raise AssertionError(f"{family.model_type}: no mapping for our parameters {missing}")
  for path, want in expected.items():
    if tuple(flat[path].shape) != tuple(want.shape):
      rule = origin[path]
      to_hf = CONVERSIONS[rule.conv][1]
      hf_want = to_hf(np.empty(want.shape, np.float32), cfg).shape
      hf_got = to_hf(flat[path], cfg).shape
      raise ValueError(f"shape mismatch for {rule.hf!r} (our {path!r}): the checkpoint has "
                       f"{tuple(hf_got)}, its config.json implies {tuple(hf_want)}")


def _check_tied(family: Family, state, flat) -> None:
  """Our MLM heads decode with the word-embedding matrix: an untied decoder is an error."""
  word = flat["encoder/embeddings/word_embeddings/embedding"]
  for alias in family.tied_aliases:
    if alias.endswith(".weight") and alias in state and not np.array_equal(state[alias], word):
      raise UnsupportedError(f"{alias!r} differs from the word embeddings: untied output "
                             "embeddings are not supported")


def from_pretrained(path: str, **config_overrides: Any) -> tuple[Encoder, dict[str, Any]]:
  """(encoder module, encoder params) from a transformers directory.

  `module.apply({"params": params}, input_ids, segment_ids, attention_mask,
  deterministic=True)["hidden_states"]` is the final hidden states [B, L, H].
  """
  imported = load(path, **config_overrides)
  return Encoder(imported.config), imported.params["encoder"]


def pretraining_params(path: str, **config_overrides: Any) -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, the full tree {"encoder", "mlm", "nsp"/"sop"/"rtd"...}) for PretrainModel."""
  imported = load(path, **config_overrides)
  return imported.config, imported.params


# --------------------------------------------------------------------------- export


def choose_architecture(family: Family, present: set[str], heads_mode: str = "auto"
                        ) -> Architecture:
  if heads_mode == "none":
    return family.architectures[-1]
  if heads_mode != "auto":
    for a in family.architectures:
      if a.cls == heads_mode:
        missing = set(a.groups) - present - ({"pooler"} if family.pair_group in present else set())
        if missing:
          raise ValueError(f"{a.cls} needs head(s) {sorted(missing)}; the checkpoint has "
                           f"{sorted(present) or 'none'}")
        return a
    raise ValueError(f"unknown architecture {heads_mode!r} for {family.model_type}; choose "
                     f"auto, none or one of {[a.cls for a in family.architectures]}")
  for a in family.architectures[:-1]:
    if set(a.groups) <= present:
      return a
  return family.architectures[-1]


def export_state_dict(family_name: str, cfg: EncoderConfig, params: Mapping[str, Any],
                      heads_mode: str = "auto") -> tuple[dict[str, np.ndarray], Architecture]:
  """Our tree -> ({HF key: array}, the transformers class it fits)."""
  family = get_family(family_name)
  _check_exportable(family, cfg)
  params = dict(params)
  present = {g.name for g in family.groups if g.name in params}
  arch = choose_architecture(family, present, heads_mode)
  if "pooler" in arch.groups and "pooler" not in params and "pooler" in params.get(
      family.pair_group, {}):
    params["pooler"] = {"dense": params[family.pair_group]["pooler"]["dense"]}
  flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
  out: dict[str, np.ndarray] = {}

  def put(rules, ours_prefix, hf_prefix):
    for rule in (r for rule in rules for r in rule.expand(cfg)):
      path = ours_prefix + rule.ours
      if path not in flat:
        raise KeyError(f"our checkpoint lacks {path!r} (for {hf_prefix + rule.hf!r})")
      out[hf_prefix + rule.hf] = np.ascontiguousarray(CONVERSIONS[rule.conv][1](flat[path], cfg))

  put(family.encoder_rules(cfg), "encoder/", family.prefix)
  for name in arch.groups:
    rules = family.group(name).rules
    if name in params:
      put(rules, "", "")
    elif any(r.expand(cfg) for r in rules):  # (MobileBERT's pooler may have no weights)
      log.warning("%s: no %r head in the checkpoint; transformers will initialise it", arch.cls,
                  name)
  if arch == family.architectures[-1]:  # a base model's own keys have no prefix
    out = {k.removeprefix(family.prefix): v for k, v in out.items()}
  return out, arch


def save_pretrained(out_dir: str, family_name: str, cfg: EncoderConfig,
                    params: Mapping[str, Any], *, heads_mode: str = "auto",
                    base_config: Mapping[str, Any] | None = None,
                    special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Writes config.json + model.safetensors; returns the config written."""
  from safetensors.numpy import save_file

  separate = _separate(family_name)
  if separate is not None:
    return separate.save_pretrained(out_dir, cfg, params, base_config=base_config,
                                    special_ids=special_ids)
  family = get_family(family_name)
  state, arch = export_state_dict(family_name, cfg, params, heads_mode)
  hf_config = hf_config_from_encoder(family, cfg, arch.cls, base_config, special_ids)
  if family.export_fixup:
    family.export_fixup(cfg, hf_config, state, arch)
  os.makedirs(out_dir, exist_ok=True)
  save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return hf_config


# --------------------------------------------------------------------------- towers

ENCODER_TOWER = "discriminator"  # export_from_workdir's default: the shared encoder
GENERATOR = "generator"  # ELECTRA's generator: a tower of the RTD objective


def tower_config_file(tower: str) -> str:
  """In WORKDIR/hf/: an imported tower's config.json (export writes it back)."""
  return f"{tower}_config.json"


def _tower_owners(tower: str, names) -> list[tuple[type[objectives.Objective], Any]]:
  """(objective class, its Tower) for each of `names` that trains the tower."""
  return [(objectives.get(n), t) for n in names for t in objectives.get(n).towers()
          if t.name == tower]


def load_tower(path: str, tower_dir: str, tower: str, **config_overrides: Any) -> Imported:
  """A checkpoint and a tower of one of its heads' objectives (ELECTRA's generator beside
  its discriminator) as ONE tree: that objective's `import_tower` places the tower in its
  parameters, checks it is the tower it would build, and gives the config values it implies
  (`Imported.sections`, set by run_config_for) and its facts (`Imported.towers[tower]`)."""
  main = load(path, **config_overrides)
  owners = _tower_owners(tower, main.objective_names)
  if not owners:
    want = sorted({a.cls for cls, t in _tower_owners(tower, objectives.available())
                   for a in get_family(t.family).architectures
                   if any(get_family(t.family).group(g).objective == cls.name
                          for g in a.groups)})
    raise UnsupportedError(f"{path!r} is not a checkpoint with {' or '.join(want)}'s head, "
                           f"whose objective trains a {tower} (model_type {main.family!r}, "
                           f"heads {list(main.groups)})")
  owner, spec = owners[0]
  imp = load(tower_dir, **config_overrides)
  if imp.family != spec.family or set(spec.groups) - set(imp.groups):
    cls = next((a.cls for a in get_family(spec.family).architectures
                if set(a.groups) == set(spec.groups)), list(spec.groups))
    raise UnsupportedError(f"{tower_dir!r} is not a {spec.family} checkpoint with {cls}'s "
                           f"head (model_type {imp.family!r}, heads {list(imp.groups)})")
  try:
    params, section, facts = owner.import_tower(tower, main.config, main.params, imp.config,
                                                imp.params)
  except ValueError as e:
    raise UnsupportedError(f"{tower} {tower_dir!r}: {e}") from e
  return dataclasses.replace(
      main, params=params, ignored=main.ignored + imp.ignored,
      towers={**main.towers, tower: {**facts, "hf_config": imp.hf_config}},
      sections={**main.sections, owner.name: {**main.sections.get(owner.name, {}), **section}})


def load_electra_pair(discriminator_dir: str, generator_dir: str,
                      **config_overrides: Any) -> Imported:
  """An ELECTRA discriminator (ElectraForPreTraining) and its generator (ElectraForMaskedLM)
  as ONE tree of objectives.rtd's layout:

    {"encoder": the discriminator, with the shared embedding tables and LayerNorm,
     "rtd": {"discriminator_head": DiscriminatorHead,
             "generator": the generator's Encoder without the shared tables
                          (its embeddings/projection, when it has one, and its layers),
             "generator_head": MLMHead (decodes with the shared word embeddings)}}

  ELECTRA ties the two towers' embedding tables and embedding LayerNorm: they must be
  equal in the two checkpoints. The generator's width must be what
  `objectives.rtd.generator_config` makes of the discriminator's at generator_size =
  hidden ratio (true of the released small/base/large pairs); `Imported.generator` holds
  that size and depth.
  """
  return load_tower(discriminator_dir, generator_dir, GENERATOR, **config_overrides)


# --------------------------------------------------------------------------- tokenizers

# Files of a transformers tokenizer; import copies whichever exist.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "added_tokens.json")
# Sentencepiece files our own data pipeline can read as WORKDIR/tokenizer.model.
SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  os.makedirs(dst, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


def sentencepiece_to_hf(model_file: str, out_dir: str, *, model_max_length: int = 512,
                        token_types: bool = True) -> Any:
  """Writes a transformers fast tokenizer (tokenizer.json + tokenizer_config.json) that
  encodes exactly as our sentencepiece model, with BERT-style [CLS] A [SEP] B [SEP].

  The sentencepiece model (unigram or BPE) is converted by transformers' own SpmConverter;
  our special pieces [PAD] [UNK] [CLS] [SEP] [MASK] keep their ids.
  """
  import sentencepiece as spm
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import SpmConverter

  sp = spm.SentencePieceProcessor(model_file=model_file)
  names = {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())}
  find = lambda *c: next((p for p in c if p in names.values()), None)  # noqa: E731
  special = {"pad_token": find("[PAD]", "<pad>"), "unk_token": find("[UNK]", "<unk>"),
             "cls_token": find("[CLS]", "<cls>", "<s>"),
             "sep_token": find("[SEP]", "<sep>", "</s>"),
             "mask_token": find("[MASK]", "<mask>")}
  missing = [k for k, v in special.items() if v is None]
  if missing:
    raise ValueError(f"{model_file}: no piece for {missing}")

  class _Spm:  # the attributes SpmConverter reads from a slow tokenizer
    vocab_file = model_file
    add_prefix_space = True

  converter = SpmConverter(_Spm())
  converter.special_tokens = set(special.values())
  tok = converter.converted()
  cls, sep = special["cls_token"], special["sep_token"]
  tok.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
      special_tokens=[(cls, sp.piece_to_id(cls)), (sep, sp.piece_to_id(sep))])
  inputs = ["input_ids", "token_type_ids", "attention_mask"] if token_types else [
      "input_ids", "attention_mask"]
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                 model_input_names=inputs, **special)
  fast.save_pretrained(out_dir)
  return fast


# --------------------------------------------------------------------------- workdirs

HF_SUBDIR = "hf"  # in a workdir: the imported config.json and tokenizer files


def run_config_for(imported: Imported, size: str = "tiny"):
  """A full run config (configs/pretrain.py format) whose model is the imported one."""
  from configs import pretrain

  preset = imported.family if imported.family in pretrain.PRESETS else "bert"
  config = pretrain.get_config(f"{preset},{size}")
  config.unlock()
  config.family = imported.family
  defaults = EncoderConfig()
  for field, value in imported.config.to_dict().items():
    if field in config.model:
      config.model[field] = value
    elif value != getattr(defaults, field):  # an option the presets do not list
      config.model[field] = value
  config.data.vocab_size = imported.config.vocab_size
  usable = imported.config.max_position_embeddings - imported.config.position_offset
  config.data.seq_len = min(config.data.seq_len, usable)
  config.objectives = imported.objectives or "mlm:1.0"
  for name, values in imported.sections.items():  # e.g. the generator_size of a tower
    for field, value in values.items():
      config[name][field] = value
    objectives.get(name).section(config)  # checked against the objective's Config
  return config


def import_to_workdir(hf_dir: str, workdir: str, size: str = "tiny",
                      generator_dir: str | None = None) -> dict[str, Any]:
  """Writes WORKDIR/config.json, an orbax checkpoint at step 0 ({"step", "params"}) and
  the tokenizer (WORKDIR/hf/*, plus WORKDIR/tokenizer.model for sentencepiece models).

  With `generator_dir`, `hf_dir` is an ELECTRA discriminator and `generator_dir` its
  generator: both go into one RTD tree (`load_electra_pair`), the run config gets the
  values the RTD objective derives from the generator (its generator_size and
  generator_layers), and its config.json is kept as WORKDIR/hf/generator_config.json (for
  `export_from_workdir(..., tower="generator")`).
  """
  from bert_jax import checkpoint, run_config

  imported = load_electra_pair(hf_dir, generator_dir) if generator_dir else load(hf_dir)
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise FileExistsError(f"{workdir!r} already holds checkpoints; import into a new workdir")
  config = run_config_for(imported, size)
  hf_dir_out = os.path.join(workdir, HF_SUBDIR)
  os.makedirs(hf_dir_out, exist_ok=True)
  shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(hf_dir_out, "config.json"))
  if generator_dir:
    shutil.copyfile(os.path.join(generator_dir, "config.json"),
                    os.path.join(hf_dir_out, tower_config_file(GENERATOR)))
  copied = copy_tokenizer_files(hf_dir, hf_dir_out)
  spm_file = next((n for n in SENTENCEPIECE_FILES if n in copied), None)
  if spm_file:
    shutil.copyfile(os.path.join(hf_dir_out, spm_file), os.path.join(workdir, "tokenizer.model"))
  elif "tokenizer.json" in copied:
    config.data.tokenizer = os.path.join(hf_dir_out, "tokenizer.json")
  else:
    log.warning("%s has no tokenizer files; give the run one with --config.data.tokenizer",
                hf_dir)
  run_config.save(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=1, keep_best=False, async_save=False)
  ckpt.save(0, {"step": np.zeros((), np.int32), "params": imported.params}, None, force=True)
  ckpt.close()
  return {"workdir": workdir, "family": imported.family, "heads": imported.groups,
          "architecture": imported.architecture, "tokenizer": copied,
          "ignored": imported.ignored, "config": imported.config,
          "generator": imported.generator and imported.generator["config"]}


def _finetuned_for_export(workdir: str, cfg: EncoderConfig, params: dict[str, Any]):
  """A fine-tuned (or compressed, bert_jax.compress) workdir: its full encoder config
  (encoder_config.json), its task pooler as the pooler, and pruned heads zero-padded back
  to full width (transformers 5.x no longer prunes on load; config.json records them as
  bert_jax_pruned_heads). Other workdirs pass through."""
  path = os.path.join(workdir, "encoder_config.json")
  extra: dict[str, Any] = {}
  if not os.path.isfile(path):
    return cfg, params, extra
  with open(path) as f:
    cfg = EncoderConfig.from_dict(json.load(f))
  task = params.get("task", {})
  if "pooler" in task and "pooler" not in params:
    params = dict(params, pooler=task["pooler"])
  if cfg.pruned_heads:
    from bert_jax.compress import prune
    extra["bert_jax_pruned_heads"] = {str(i): list(h) for i, h in enumerate(cfg.pruned_heads)
                                      if h}
    cfg, params = prune.pad_pruned_heads(cfg, params)
  return cfg, params, extra


def export_from_workdir(workdir: str, out_dir: str, step: int | None = None,
                        which: str = "latest", heads_mode: str = "auto",
                        tower: str = ENCODER_TOWER) -> dict[str, Any]:
  """A run's checkpoint (imported or pretrained by us) -> a transformers directory.

  Another `tower` writes a tower of one of the run's objectives instead of the encoder,
  as that objective's `export_tower` gives it: `tower="generator"` an RTD (ELECTRA) run's
  generator, as an ElectraForMaskedLM with the shared embedding tables.
  """
  from bert_jax import checkpoint, run_config

  config = run_config.load(workdir)
  family = config.get("family", "bert")
  fine_tuned = os.path.isfile(os.path.join(workdir, "encoder_config.json"))
  cfg = None if fine_tuned else EncoderConfig.from_dict(config.model)
  owner = None
  if tower != ENCODER_TOWER:
    owners = _tower_owners(tower, [n for n, _ in objectives.parse_spec(config.objectives)])
    if not owners:
      raise ValueError(f"tower={tower!r}: no objective of this run ({config.objectives}) "
                       f"trains one; {ENCODER_TOWER!r} exports the encoder")
    owner, spec = owners[0]
  params, step = checkpoint.restore_params(workdir, step, which)
  params = jax.tree.map(np.asarray, params)
  cfg, params, pruned_base = _finetuned_for_export(workdir, cfg, params)
  base_file = "config.json"
  if owner is not None:
    family, base_file = spec.family, tower_config_file(tower)
    cfg, params = owner.export_tower(tower, cfg, params, owner.section(config))
  base, special = None, None
  hf_in = os.path.join(workdir, HF_SUBDIR)
  if os.path.isfile(os.path.join(hf_in, base_file)):
    with open(os.path.join(hf_in, base_file)) as f:
      base = json.load(f)
  if pruned_base:
    base = dict(base or {}, **pruned_base)
  from bert_jax.data import tokenizer as tokenizer_lib
  own = tokenizer_lib.workdir_tokenizer(workdir)  # tokenizer.model, else tokenizer.json
  if base is None and own is not None:
    tok = tokenizer_lib.load_tokenizer(own)
    special = {"pad_token_id": tok.pad_id, "bos_token_id": tok.cls_id,
               "eos_token_id": tok.sep_id}
  separate = _separate(family)
  known = set(separate.GROUPS if separate is not None
              else (g.name for g in get_family(family).groups))
  skipped = sorted(set(params) - known - {"encoder"})
  if skipped:
    log.info("not exported (no transformers counterpart): %s", skipped)
  hf_config = save_pretrained(out_dir, family, cfg, params, heads_mode=heads_mode,
                              base_config=base, special_ids=special)
  tokenizer = copy_tokenizer_files(hf_in, out_dir) if os.path.isdir(hf_in) else []
  if not tokenizer and own is not None and own.suffix == ".model":
    sentencepiece_to_hf(str(own), out_dir, model_max_length=cfg.max_position_embeddings
                        - cfg.position_offset, token_types=cfg.type_vocab_size > 0)
    tokenizer = ["tokenizer.json", "tokenizer_config.json"]
  if not tokenizer and own is not None and own.suffix == ".json":  # an imported tokenizer
    shutil.copyfile(own, os.path.join(out_dir, "tokenizer.json"))
    tokenizer = ["tokenizer.json"]
  if not tokenizer:
    log.warning("%s has no tokenizer; %s holds the model alone", workdir, out_dir)
  return {"out_dir": out_dir, "step": step, "architecture": hf_config["architectures"][0],
          "family": family, "tokenizer": tokenizer, "skipped": skipped, "tower": tower}
