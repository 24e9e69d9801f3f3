"""Sentence-pair classification objectives on [CLS]: the shared part of NSP and SOP.

Head: BERT's pooler (dense + tanh on [CLS]) then dense(2), parameters at
params[<name>]["pooler"] and params[<name>]["classifier"]. Label 1 means "random next
segment" (NSP) or "swapped" (SOP); the example builder makes the pairs.

Input: as in BERT and ALBERT, the classifier reads the masked input that MLM reads (the
`MaskedView` of config.mlm, so beside MLM it is the same pass); `input: clean` reads the
clean segments instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bert_jax import heads
from objectives.base import CLEAN, Objective, SpecialIds
from objectives.mlm import MaskedView


class PairClassifierHead(nn.Module):
  cfg: Any
  num_classes: int = 2

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del batch, encoder
    pooled = heads.Pooler(self.cfg, name="pooler")(encoded["hidden_states"])
    # BERT's pretraining heads apply no dropout after the pooler.
    return heads.Classifier(self.cfg, self.num_classes, dropout=0.0, name="classifier")(
        pooled, deterministic=deterministic)


class PairLogits(nn.Module):
  """transformers' pair head at params[name] (*ForPreTraining's seq_relationship /
  sop_classifier): {"logits": [B, 2], "pooled": the pooler's output}."""

  cfg: Any

  @nn.compact
  def __call__(self, hidden, encoder, *, deterministic: bool):
    del encoder
    pooled = heads.Pooler(self.cfg, name="pooler")(hidden)
    logits = heads.Classifier(self.cfg, 2, dropout=0.0, name="classifier")(
        pooled, deterministic=deterministic)
    return {"logits": logits, "pooled": pooled}


def pair_loss(logits_Bx2, labels_B):
  ce = heads.softmax_cross_entropy(logits_Bx2, labels_B)
  n = jnp.asarray(labels_B.shape[0], jnp.float32)
  correct = jnp.sum((jnp.argmax(logits_Bx2, -1) == labels_B).astype(jnp.float32))
  return jnp.mean(ce), {"loss": heads.metric(jnp.sum(ce), n),
                        "accuracy": heads.metric(correct, n)}


INPUTS = ("masked", "clean")


@dataclasses.dataclass(frozen=True)
class PairConfig:
  """config.nsp / config.sop."""

  input: str = "masked"  # masked: the MLM-masked segments (BERT, ALBERT) | clean

  def __post_init__(self):
    if self.input not in INPUTS:
      raise ValueError(f"input: {self.input!r} is not one of {INPUTS}")


@dataclasses.dataclass(frozen=True)
class SentencePairObjective(Objective):
  """Subclasses set `name` and `example_kind` (a pair ExampleKind, or a kind with its
  own planner) and, for more than two labels, `num_classes`."""

  Config = PairConfig

  masked: MaskedView | None = None  # None: the clean input

  @classmethod
  def from_config(cls, config, special: SpecialIds):
    c = cls.section(config)
    return cls(MaskedView.from_config(config, special) if c.input == "masked" else None)

  def view(self):
    return self.masked if self.masked is not None else CLEAN

  def torch_peer(self):  # BertForPreTraining's pooler + 2-way head, with MLM
    return "objectives.torch_peers:bert"

  hf_head_kind = "pair"

  @classmethod
  def hf_head(cls, encoder_config, name):
    return PairLogits(encoder_config, name=name)

  num_classes = 2  # sentence_label takes values 0..num_classes-1

  def head(self, encoder_config, name):
    return PairClassifierHead(encoder_config, self.num_classes, name=name)

  def loss(self, outputs, inputs):
    return pair_loss(outputs, inputs["sentence_label"])

  @classmethod
  def pooler_path(cls):
    return (cls.name, "pooler")
