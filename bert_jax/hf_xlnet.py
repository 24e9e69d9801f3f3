"""XLNet checkpoints in both directions: transformers' `XLNetLMHeadModel` <-> bert-jax.

XLNet is our Encoder with `position_embedding="relative"`, `relative_segments=True`,
`embedding_norm=False`, `attention_bias=False`, `type_vocab_size=0` (no absolute
positions, token types or embedding LayerNorm), post-LN; its PLM head is
`objectives.plm` with `head_transform=False` (tied word embeddings + bias) and its mask
embedding. Our tree:

  {"encoder": ...,                       the shared Encoder
   "plm": {"mask_emb": [H], "bias": [V]}}  XLNetModel.mask_emb, XLNetLMHeadModel.lm_loss.bias

Supported: attn_type="bi", bi_data=False, clamp_len <= 0 (no clamping), d_head * n_head ==
d_model. Not carried: memory (mem_len, reuse_len; our encoder has no recurrence) and the
sequence-summary / QA heads. Reading goes through `bert_jax.hf.read_checkpoint` (numpy +
safetensors); writing writes config.json + model.safetensors.

The permutation inputs convert both ways: `hf_permutation_inputs` turns a batch corrupted by
objectives.plm into transformers' `perm_mask` (1 = i may NOT attend to j) and
`target_mapping` (one-hot [B, P, L]).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bert_jax import hf
from bert_jax.encoder import EncoderConfig

log = logging.getLogger(__name__)

MODEL_TYPE = "xlnet"
ARCHITECTURE = "XLNetLMHeadModel"
PREFIX = "transformer."
# Our activation names <-> transformers' ff_activation.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu", "silu": "silu"}
_HF_ACTIVATIONS = {**{v: k for k, v in _ACTIVATIONS.items()}, "swish": "silu"}
# The objective XLNet's LM head is (its params["plm"]), and the config.plm values of
# transformers' head: tied word embeddings + bias, no transform.
OBJECTIVE = "plm"
HEAD_SECTION = {"head_transform": False}
GROUPS = (OBJECTIVE,)  # our head groups that export writes
# EncoderConfig fields that make our encoder XLNet.
XLNET_OPTIONS = dict(position_embedding="relative", relative_segments=True,
                     embedding_norm=False, attention_bias=False, type_vocab_size=0,
                     pre_layer_norm=False, num_layer_groups=None, embedding_size=None,
                     position_offset=0)


class UnsupportedError(ValueError):
  """A checkpoint or config that bert-jax's XLNet cannot represent."""


# --------------------------------------------------------------------------- configs


def encoder_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> EncoderConfig:
  """XLNetConfig (config.json) -> EncoderConfig."""
  c = dict(hf_config)
  if c.get("model_type", MODEL_TYPE) != MODEL_TYPE:
    raise UnsupportedError(f"not an XLNet checkpoint: model_type={c.get('model_type')!r}")
  problems = []
  if c.get("attn_type", "bi") != "bi":
    problems.append(f"attn_type={c['attn_type']!r} (only 'bi')")
  if c.get("bi_data", False):
    problems.append("bi_data=True")
  if (c.get("clamp_len") or -1) > 0:
    problems.append(f"clamp_len={c['clamp_len']} (no clamping of relative distances)")
  d_model, n_head = c.get("d_model", 1024), c.get("n_head", 16)
  if c.get("d_head", d_model // n_head) * n_head != d_model:
    problems.append(f"d_head={c.get('d_head')} * n_head={n_head} != d_model={d_model}")
  act = c.get("ff_activation", "gelu")
  if act not in _HF_ACTIVATIONS:
    problems.append(f"ff_activation={act!r}")
  if problems:
    raise UnsupportedError("unsupported XLNet config: " + "; ".join(problems))
  if c.get("mem_len"):
    log.warning("XLNet mem_len=%s: bert-jax has no memory; the model runs without it",
                c["mem_len"])
  fields = dict(
      vocab_size=c.get("vocab_size", 32000), hidden_size=d_model,
      num_layers=c.get("n_layer", 24), num_heads=n_head,
      intermediate_size=c.get("d_inner", 4096), hidden_act=_HF_ACTIVATIONS[act],
      hidden_dropout=c.get("dropout", 0.1), attention_dropout=c.get("dropout", 0.1),
      layer_norm_eps=c.get("layer_norm_eps", 1e-12),
      initializer_range=c.get("initializer_range", 0.02), max_position_embeddings=512,
      **XLNET_OPTIONS)
  fields.update(overrides)
  return EncoderConfig.from_dict(fields)


def check_exportable(cfg: EncoderConfig) -> None:
  wrong = [f"{k}={getattr(cfg, k)!r} (XLNet: {v!r})" for k, v in XLNET_OPTIONS.items()
           if getattr(cfg, k) != v and not (k == "num_layer_groups" and
                                             getattr(cfg, k) == cfg.num_layers)]
  if cfg.hidden_act not in _ACTIVATIONS:
    wrong.append(f"hidden_act={cfg.hidden_act!r}")
  if wrong:
    raise UnsupportedError("cannot export to xlnet: " + "; ".join(wrong))


def hf_config_from_encoder(cfg: EncoderConfig, base_config: Mapping[str, Any] | None = None,
                           special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  check_exportable(cfg)
  if cfg.hidden_dropout != cfg.attention_dropout:
    log.warning("XLNet has one dropout rate; writing hidden_dropout=%s", cfg.hidden_dropout)
  out = dict(base_config or {})
  out.update(
      model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=cfg.vocab_size,
      d_model=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
      d_head=cfg.head_dim, d_inner=cfg.intermediate_size,
      ff_activation=_ACTIVATIONS[cfg.hidden_act], untie_r=True, attn_type="bi",
      initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
      dropout=cfg.hidden_dropout, mem_len=None, reuse_len=None, bi_data=False,
      clamp_len=-1, same_length=False, tie_word_embeddings=True)
  for key, value in (special_ids or {}).items():
    out[key] = value
  return out


# --------------------------------------------------------------------------- weights

# (HF name under "transformer.layer.{i}.", our path under "encoder/layer_{i}/", conversion)
_LAYER = (
    ("rel_attn.q", "attention/query/kernel", "copy"),
    ("rel_attn.k", "attention/key/kernel", "copy"),
    ("rel_attn.v", "attention/value/kernel", "copy"),
    ("rel_attn.r", "attention/relative/kernel", "copy"),
    ("rel_attn.o", "attention/output/kernel", "o"),
    ("rel_attn.r_w_bias", "attention/r_w_bias", "copy"),
    ("rel_attn.r_r_bias", "attention/r_r_bias", "copy"),
    ("rel_attn.r_s_bias", "attention/r_s_bias", "copy"),
    ("rel_attn.seg_embed", "attention/seg_embed", "copy"),
    ("rel_attn.layer_norm.weight", "attention_norm/norm/scale", "copy"),
    ("rel_attn.layer_norm.bias", "attention_norm/norm/bias", "copy"),
    ("ff.layer_1.weight", "ffn/intermediate/kernel", "dense"),
    ("ff.layer_1.bias", "ffn/intermediate/bias", "copy"),
    ("ff.layer_2.weight", "ffn/output/kernel", "dense"),
    ("ff.layer_2.bias", "ffn/output/bias", "copy"),
    ("ff.layer_norm.weight", "ffn_norm/norm/scale", "copy"),
    ("ff.layer_norm.bias", "ffn_norm/norm/bias", "copy"),
)
# name -> (HF -> ours, ours -> HF), exact inverses.
_CONV = {
    "copy": (lambda w: w, lambda a: a),
    "dense": (lambda w: w.T, lambda a: a.T),
    # o: [d_model, heads, head_dim] (einsum "ibnd,hnd->ibh") <-> DenseGeneral [heads, head_dim, d_model]
    "o": (lambda w: w.transpose(1, 2, 0), lambda a: a.transpose(2, 0, 1)),
    "mask_emb": (lambda w: w.reshape(-1), lambda a: a.reshape(1, 1, -1)),
}
_TOP = (
    (PREFIX + "word_embedding.weight", "encoder/embeddings/word_embeddings/embedding", "copy"),
    (PREFIX + "mask_emb", "plm/mask_emb", "mask_emb"),
)
_LM_BIAS = ("lm_loss.bias", "plm/bias", "copy")
_IGNORED_PREFIXES = ("sequence_summary.", "logits_proj.", "qa_outputs.", "start_logits.",
                     "end_logits.", "answer_class.")


def _rules(cfg: EncoderConfig, with_lm: bool):
  rules = list(_TOP)
  for i in range(cfg.num_layers):
    rules += [(f"{PREFIX}layer.{i}.{h}", f"encoder/layer_{i}/{o}", c) for h, o, c in _LAYER]
  if with_lm:
    rules.append(_LM_BIAS)
  return rules


def params_from_state_dict(cfg: EncoderConfig, state: Mapping[str, np.ndarray]
                           ) -> tuple[dict[str, Any], tuple[str, ...]]:
  """{HF name: array} -> (our tree {"encoder", "plm"}, the HF keys left unused)."""
  if not any(k.startswith(PREFIX) for k in state):  # a bare XLNetModel's keys
    state = {PREFIX + k: v for k, v in state.items()}
  with_lm = _LM_BIAS[0] in state
  flat, used = {}, set()
  for key, ours, conv in _rules(cfg, with_lm):
    if key not in state:
      raise KeyError(f"XLNet checkpoint lacks weight {key!r} (needed for our {ours!r})")
    flat[ours] = np.ascontiguousarray(_CONV[conv][0](np.asarray(state[key], np.float32)))
    used.add(key)
  if not with_lm:  # XLNetModel: no output bias; the PLM head starts from zeros
    flat["plm/bias"] = np.zeros((cfg.vocab_size,), np.float32)
  word = flat["encoder/embeddings/word_embeddings/embedding"]
  if "lm_loss.weight" in state:
    if not np.array_equal(state["lm_loss.weight"], word):
      raise UnsupportedError("lm_loss.weight differs from the word embeddings: untied "
                             "output embeddings are not supported")
    used.add("lm_loss.weight")
  unused = tuple(sorted(k for k in set(state) - used if not k.startswith(_IGNORED_PREFIXES)))
  _check_shapes(cfg, flat)
  return hf._unflatten(flat), unused


def _check_shapes(cfg: EncoderConfig, flat: Mapping[str, np.ndarray]) -> None:
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import objectives
  from bert_jax.model import PretrainModel

  # The objective as a run with XLNet's head builds it, on the inputs it makes itself.
  obj = objectives.get(OBJECTIVE).from_config({OBJECTIVE: HEAD_SECTION}, None)
  clean = {"input_ids": jnp.zeros((1, 4), jnp.int32), "attention_mask": jnp.ones((1, 4)),
           "segment_ids": jnp.zeros((1, 4), jnp.int32), "word_ids": jnp.arange(4)[None],
           "example_id": jnp.zeros((1,), jnp.int32)}

  def init():
    batch = objectives.corrupt_one(obj, clean, jax.random.PRNGKey(0))[1]
    return PretrainModel(cfg, (obj,)).init(jax.random.PRNGKey(0), batch, deterministic=True)

  shapes = jax.eval_shape(init)
  expected = hf._flatten(nn.meta.unbox(shapes["params"]))
  missing, extra = set(expected) - set(flat), set(flat) - set(expected)
  if missing or extra:  # the mapping table out of step with the modules: our bug
    raise AssertionError(f"xlnet mapping: missing {sorted(missing)}, extra {sorted(extra)}")
  for path, want in expected.items():
    if tuple(flat[path].shape) != tuple(want.shape):
      raise ValueError(f"shape mismatch for our {path!r}: the checkpoint has "
                       f"{flat[path].shape}, its config.json implies {want.shape}")


def export_state_dict(cfg: EncoderConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our tree {"encoder", "plm"} -> {HF name: array} of an XLNetLMHeadModel (without the
  tied lm_loss.weight; transformers ties it to the word embeddings)."""
  check_exportable(cfg)
  flat = {k: np.asarray(v, np.float32) for k, v in hf._flatten(params).items()}
  if "plm/mask_emb" not in flat:
    raise KeyError("the checkpoint has no PLM head (params['plm']['mask_emb']): XLNet needs "
                   "its mask embedding; pretrain with objectives='plm:1.0'")
  if "plm/bias" not in flat:
    raise KeyError("the PLM head has no output bias: pretrain with plm.head_transform=False "
                   "(XLNet's head) to export an XLNetLMHeadModel")
  out = {}
  for key, ours, conv in _rules(cfg, True):
    out[key] = np.ascontiguousarray(_CONV[conv][1](flat[ours]))
  return out


# --------------------------------------------------------------------------- files


def load(path: str, **config_overrides: Any) -> hf.Imported:
  """A transformers XLNet directory -> `hf.Imported` (family "xlnet", groups ("plm",))."""
  hf_config, state = hf.read_checkpoint(path)
  cfg = encoder_config_from_hf(hf_config, **config_overrides)
  params, unused = params_from_state_dict(cfg, state)
  if unused:
    log.warning("%s: ignoring %d weights with no place in bert-jax: %s", path, len(unused),
                ", ".join(unused[:10]))
  return hf.Imported(MODEL_TYPE, cfg, params, hf_config, GROUPS,
                     (hf_config.get("architectures") or [ARCHITECTURE])[0], unused,
                     objective_names=(OBJECTIVE,), sections={OBJECTIVE: dict(HEAD_SECTION)})


def save_pretrained(out_dir: str, cfg: EncoderConfig, params: Mapping[str, Any], *,
                    base_config: Mapping[str, Any] | None = None,
                    special_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """Writes config.json + model.safetensors of an XLNetLMHeadModel; returns the config."""
  from safetensors.numpy import save_file

  state = export_state_dict(cfg, params)
  hf_config = hf_config_from_encoder(cfg, base_config, special_ids)
  os.makedirs(out_dir, exist_ok=True)
  save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  return hf_config


# --------------------------------------------------------------------------- inputs


def hf_permutation_inputs(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A batch corrupted by objectives.plm -> transformers' XLNet inputs.

  perm_mask[b, i, j] = 1 where i may not attend to j: the complement of our content mask,
  plus the diagonal at targets (transformers' content stream always sees itself, its query
  stream never does when perm_mask[i, i] = 1). target_mapping[b, p, l] = 1 where slot p
  predicts position l (all zero for unused slots).
  """
  content = np.asarray(batch["plm_content_mask"], bool)
  target = np.asarray(batch["plm_target"], bool)
  L = content.shape[-1]
  perm = ~content | (np.eye(L, dtype=bool)[None] & target[:, :, None])
  positions = np.asarray(batch["plm_positions"])
  weights = np.asarray(batch["plm_weights"]) > 0
  mapping = (np.arange(L)[None, None] == positions[..., None]) & weights[..., None]
  return {"input_ids": np.asarray(batch["input_ids"]),
          "attention_mask": np.asarray(batch["attention_mask"]),
          "token_type_ids": np.asarray(batch.get("segment_ids",
                                                 np.zeros_like(batch["input_ids"]))),
          "perm_mask": perm.astype(np.float32), "target_mapping": mapping.astype(np.float32)}


__all__ = ["ARCHITECTURE", "GROUPS", "HEAD_SECTION", "MODEL_TYPE", "OBJECTIVE", "XLNET_OPTIONS",
           "UnsupportedError", "check_exportable", "encoder_config_from_hf", "export_state_dict",
           "hf_config_from_encoder", "hf_permutation_inputs", "load", "params_from_state_dict",
           "save_pretrained"]
