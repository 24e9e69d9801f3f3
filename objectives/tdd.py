"""Token-deletion detection: drop about 15% of the tokens and predict, at every remaining
position, whether tokens were deleted just before it.

Recipe (defaults): each regular token (never [CLS], [SEP] or padding) is deleted with
probability 0.15 (a Bernoulli draw per token); the rest close up (positions, segments and
the attention mask move with them; padding fills the end). Label 1 at a kept token whose
original predecessor was deleted (a run of deletions gives one label, on the token after
it, [SEP] included). Head: ELECTRA's discriminator head (dense + activation + dense(1)),
sigmoid CE over every kept token but [CLS]. On device: the `DeletedView`.

Chance: the label-1 fraction is about rate * (1 - rate) / (1 - rate) = 0.15 of the kept
tokens, so predicting "no deletion" everywhere scores about 0.85 accuracy; AUC 0.5.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import objectives
from objectives.base import Objective, SpecialIds, View
from objectives.cap import TokenLogits
from objectives.rtd import discriminator_loss


@dataclasses.dataclass(frozen=True)
class TDDConfig:
  """config.tdd: token-deletion detection."""

  rate: float = 0.15

  def __post_init__(self):
    if not 0 < self.rate < 1:
      raise ValueError(f"tdd.rate must be in (0, 1), got {self.rate}")


def delete_tokens(key, ids, segments, attention, candidates, *, rate: float, pad_id: int):
  """One sequence -> (ids, segments, attention, labels, weights), all [L]."""
  (length,) = ids.shape
  real = attention > 0
  deleted = candidates & real & (jax.random.uniform(key, (length,)) < rate)
  keep = real & ~deleted
  order = jnp.argsort(~keep, stable=True)  # kept tokens first, in order
  kept = keep[order]
  before = jnp.concatenate([jnp.zeros((1,), bool), deleted[:-1]])  # predecessor deleted
  return (jnp.where(kept, ids[order], pad_id), jnp.where(kept, segments[order], 0),
          kept.astype(attention.dtype), (before[order] & kept).astype(jnp.int32),
          (kept & (order > 0)).astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class DeletedView(View):
  """The clean batch with tokens deleted: input_ids, segment_ids and attention_mask (the
  encoder reads all three), tdd_labels and tdd_weights."""

  name = "deleted"

  rate: float
  pad_id: int

  def make(self, clean, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(clean["example_id"])
    segments = clean.get("segment_ids", jnp.zeros_like(clean["input_ids"]))
    one = lambda k, x, s, a, c: delete_tokens(k, x, s, a, c, rate=self.rate,  # noqa: E731
                                              pad_id=self.pad_id)
    ids, seg, attn, labels, weights = jax.vmap(one)(
        keys, clean["input_ids"], segments, clean["attention_mask"], clean["word_ids"] >= 0)
    return {"input_ids": ids.astype(jnp.int32), "segment_ids": seg, "attention_mask": attn,
            "tdd_labels": labels, "tdd_weights": weights}


@objectives.register
@dataclasses.dataclass(frozen=True)
class TokenDeletion(Objective):
  name = "tdd"
  Config = TDDConfig

  deleted: DeletedView

  @classmethod
  def from_config(cls, config, special: SpecialIds):
    return cls(DeletedView(cls.section(config).rate, special.pad))

  def view(self):
    return self.deleted

  def head(self, encoder_config, name):
    return TokenLogits(encoder_config, name=name)

  def loss(self, outputs, inputs):
    return discriminator_loss(outputs, inputs["tdd_labels"], inputs["tdd_weights"])
