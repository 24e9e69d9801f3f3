"""The PyTorch (transformers) peers that launch/benchmark.py times beside our step.

An objective names its peer with `Objective.torch_peer()` ("objectives.torch_peers:bert");
the objectives that run together must name the same one (MLM and NSP: one
BertForPreTraining). A builder is called as builder(config, setup, corrupted, device) with
the batches our corruption made (Composition.corrupt's {"clean", "views", "own"}, as numpy)
and returns a `PeerModel`: the model on `device`, its batches (the same masking, labels
-100 where nothing is predicted), its loss, and its FLOPs by bert_jax.flops' formulas
(what the peer computes: it projects every position onto the vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from bert_jax import flops


@dataclasses.dataclass
class PeerModel:
  name: str
  model: Any  # a torch.nn.Module on the device, in train mode
  batches: list[dict[str, Any]]  # torch tensors on the device
  flops: flops.StepFlops  # per step, hand formula
  loss_fn: Callable[[dict[str, Any]], Any] | None = None  # default: model(**batch).loss


def _one(setup, cls):
  """The composition's objective of type `cls` (the one whose inputs the peer reads)."""
  found = [w.objective for w in setup.objectives if isinstance(w.objective, cls)]
  if not found:
    raise ValueError(f"this peer needs a {cls.__name__} objective; the run has "
                     f"{[w.objective.name for w in setup.objectives]}")
  return found[0]


def mlm_labels(inputs: dict[str, Any]):
  """Our gathered MLM targets as a [B, L] label array, -100 where nothing is predicted."""
  import numpy as np
  labels = np.full(inputs["input_ids"].shape, -100, np.int64)
  rows, cols = np.nonzero(inputs["mlm_weights"] > 0)
  labels[rows, inputs["mlm_positions"][rows, cols]] = inputs["mlm_ids"][rows, cols]
  return labels


def to_torch(b: dict[str, Any], device: str) -> dict[str, Any]:
  import numpy as np
  import torch
  return {k: torch.as_tensor(np.asarray(v, np.int64), device=device) for k, v in b.items()}


def bert(config, setup, corrupted: list[dict[str, Any]], device: str) -> PeerModel:
  """transformers' BERT of our sizes: BertForPreTraining when the run's examples are
  segment pairs (NSP, or SOP: the same pooler + 2-way head), else BertForMaskedLM."""
  import torch
  import transformers
  from objectives.mlm import MaskedLM

  cfg = setup.model.encoder_config
  if cfg.embed_size != cfg.hidden_size or cfg.pre_layer_norm or cfg.num_layer_groups:
    raise ValueError("--peer hf builds BERT: factorized embeddings, pre-LN and layer "
                     "sharing have no BertFor* counterpart")
  mlm = _one(setup, MaskedLM)
  pair = setup.objectives.example_kind.segments == 2
  hf_cfg = transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
      hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.layer_norm_eps,
      initializer_range=cfg.initializer_range, attn_implementation="sdpa")
  cls = transformers.BertForPreTraining if pair else transformers.BertForMaskedLM
  torch.manual_seed(config.seed)
  model = cls(hf_cfg).to(device)
  model.train()
  batches = []
  for c in corrupted:
    i = setup.objectives.inputs(c, mlm)
    b = {"input_ids": i["input_ids"], "token_type_ids": i["segment_ids"],
         "attention_mask": i["attention_mask"], "labels": mlm_labels(i)}
    if pair:
      b["next_sentence_label"] = i["sentence_label"]
    batches.append(to_torch(b, device))
  B, L = corrupted[0]["clean"]["input_ids"].shape
  return PeerModel(f"transformers {cls.__name__} (PyTorch {torch.__version__}, sdpa)", model,
                   batches, flops.mlm_step_flops(cfg, B, L, L, pair_head=pair))


def _electra_config(cfg, **kw):
  import transformers
  return transformers.ElectraConfig(
      vocab_size=cfg.vocab_size, embedding_size=cfg.embed_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
      hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.layer_norm_eps,
      initializer_range=cfg.initializer_range, attn_implementation="sdpa", **kw)


def electra(config, setup, corrupted: list[dict[str, Any]], device: str) -> PeerModel:
  """ELECTRA as its reference trains it, from transformers' classes: an ElectraForMaskedLM
  generator and an ElectraForPreTraining discriminator sharing the embedding tables and
  embedding LayerNorm; replacements sampled (Gumbel-max) at the masked positions without
  gradient; loss = gen_weight x MLM + disc_weight x RTD."""
  import torch
  import transformers
  from objectives.rtd import ReplacedTokenDetection

  cfg = setup.model.encoder_config
  rtd = _one(setup, ReplacedTokenDetection)
  gen_cfg = rtd.generator(cfg)
  if cfg.pre_layer_norm or cfg.num_layer_groups:
    raise ValueError("--peer hf builds ELECTRA: pre-LN and layer sharing have no "
                     "Electra* counterpart")
  torch.manual_seed(config.seed)
  disc = transformers.ElectraForPreTraining(_electra_config(cfg)).to(device)
  gen = transformers.ElectraForMaskedLM(_electra_config(gen_cfg)).to(device)
  gen.electra.embeddings = disc.electra.embeddings  # shared tables + embedding LayerNorm
  gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
  model = torch.nn.ModuleDict({"generator": gen, "discriminator": disc})
  model.train()

  batches = []
  for c in corrupted:
    i = setup.objectives.inputs(c, rtd)
    b = to_torch({"input_ids": i["input_ids"], "token_type_ids": i["segment_ids"],
                  "attention_mask": i["attention_mask"], "labels": mlm_labels(i),
                  "original_ids": i["original_ids"]}, device)
    b["masked"] = b["labels"] != -100
    batches.append(b)

  def loss_fn(b):
    g = gen(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
            attention_mask=b["attention_mask"], labels=b["labels"])
    with torch.no_grad():
      logits = g.logits[b["masked"]].float() / rtd.temperature
      u = torch.rand_like(logits).clamp_(1e-9, 1.0)
      sampled = torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)
      disc_ids = b["original_ids"].clone()
      disc_ids[b["masked"]] = sampled
      labels = (disc_ids != b["original_ids"]).long()
    d = disc(input_ids=disc_ids, token_type_ids=b["token_type_ids"],
             attention_mask=b["attention_mask"], labels=labels)
    return rtd.gen_weight * g.loss + rtd.disc_weight * d.loss

  B, L = corrupted[0]["clean"]["input_ids"].shape
  return PeerModel(f"transformers ElectraForMaskedLM + ElectraForPreTraining "
                   f"(PyTorch {torch.__version__}, sdpa)", model, batches,
                   flops.electra_step_flops(cfg, gen_cfg, B, L, L), loss_fn)
