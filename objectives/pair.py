"""Sentence-pair classification objectives on [CLS]: the shared part of NSP and SOP.

Head: BERT's pooler (dense + tanh on [CLS]) then dense(2), parameters at
params[<name>]["pooler"] and params[<name>]["classifier"]. Label 1 means "random next
segment" (NSP) or "swapped" (SOP); the example builder makes the pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bert_jax import heads
from objectives.base import Objective


class PairClassifierHead(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del batch, encoder
    pooled = heads.Pooler(self.cfg, name="pooler")(encoded["hidden_states"])
    # BERT's pretraining heads apply no dropout after the pooler.
    return heads.Classifier(self.cfg, 2, dropout=0.0, name="classifier")(
        pooled, deterministic=deterministic)


def pair_loss(logits_Bx2, labels_B):
  ce = heads.softmax_cross_entropy(logits_Bx2, labels_B)
  n = jnp.asarray(labels_B.shape[0], jnp.float32)
  correct = jnp.sum((jnp.argmax(logits_Bx2, -1) == labels_B).astype(jnp.float32))
  return jnp.mean(ce), {"loss": heads.metric(jnp.sum(ce), n),
                        "accuracy": heads.metric(correct, n)}


@dataclasses.dataclass(frozen=True)
class SentencePairObjective(Objective):
  """Subclasses set `name` and `example_kind` ("nsp" or "sop")."""

  @classmethod
  def from_config(cls, config, special):
    del config, special
    return cls()

  def head(self, encoder_config, name):
    return PairClassifierHead(encoder_config, name=name)

  def loss(self, outputs, batch):
    return pair_loss(outputs, batch["sentence_label"])
