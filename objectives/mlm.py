"""Masked language modelling (BERT, RoBERTa; ALBERT n-grams; SpanBERT spans).

Corruption is `objectives.masking` (80/10/10 by default). Dynamic masking (RoBERTa, the
default) draws a fresh mask from the step's key; static masking (BERT's offline
`dupe_factor` copies) derives the key from the example's id and its epoch modulo
dupe_factor, so an example sees at most dupe_factor different masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import objectives
from bert_jax import heads
from objectives.base import Objective, SpecialIds
from objectives.masking import MaskingConfig, mask_batch


def mask_padded_vocab(logits_BxPxV, vocab_size: int | None):
  """Rows of a table padded past the tokenizer's vocabulary (to a multiple of 128) are
  never targets: keep them out of the softmax so padding changes nothing."""
  if vocab_size is None or vocab_size >= logits_BxPxV.shape[-1]:
    return logits_BxPxV
  valid = jnp.arange(logits_BxPxV.shape[-1]) < vocab_size
  return jnp.where(valid, logits_BxPxV, jnp.finfo(logits_BxPxV.dtype).min)


def masked_lm_loss(logits_BxPxV, ids_BxP, weights_BxP, vocab_size: int | None = None):
  """BERT's loss: sum(w * CE) / (sum(w) + 1e-5), plus loss and accuracy as (sum, count)."""
  logits_BxPxV = mask_padded_vocab(logits_BxPxV, vocab_size)
  ce = heads.softmax_cross_entropy(logits_BxPxV, ids_BxP)
  w = weights_BxP.astype(jnp.float32)
  total = jnp.sum(w)
  loss = jnp.sum(ce * w) / (total + 1e-5)
  correct = (jnp.argmax(logits_BxPxV, -1) == ids_BxP).astype(jnp.float32)
  return loss, {"loss": heads.metric(jnp.sum(ce * w), total),
                "accuracy": heads.metric(jnp.sum(correct * w), total)}


class MLMHeadOnPositions(nn.Module):
  """The MLM head applied at the gathered masked positions (or at every position)."""

  cfg: Any
  predict_all: bool = False

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del deterministic
    head = heads.MLMHead(self.cfg, name="head")
    hidden = encoded["hidden_states"]
    if self.predict_all:  # the plain path: vocabulary logits everywhere, then gather
      logits = head(hidden, encoder)
      return jnp.take_along_axis(logits, batch["mlm_positions"][..., None], axis=1)
    return head(heads.gather_positions(hidden, batch["mlm_positions"]), encoder)


@objectives.register
@dataclasses.dataclass(frozen=True)
class MaskedLM(Objective):
  name = "mlm"

  masking: MaskingConfig
  special: SpecialIds
  static: bool = False
  dupe_factor: int = 10
  seed: int = 0
  predict_all: bool = False

  @classmethod
  def from_config(cls, config, special):
    c = config.mlm
    masking = MaskingConfig(
        rate=c.rate, max_predictions=c.max_predictions, mask_prob=c.mask_prob,
        random_prob=c.random_prob, whole_word=c.whole_word, span=c.span,
        max_ngram=c.max_ngram, span_p=c.span_p, max_span=c.max_span)
    if c.dupe_factor < 1:
      raise ValueError(f"mlm.dupe_factor must be >= 1, got {c.dupe_factor}")
    return cls(masking=masking, special=special, static=c.static, dupe_factor=c.dupe_factor,
               seed=config.seed, predict_all=c.predict_all)

  def example_keys(self, batch, key):
    """One masking key per example."""
    if self.static:
      base = jax.random.fold_in(jax.random.PRNGKey(self.seed), 0x5a71c)
      copy = batch["epoch"] % self.dupe_factor
      return jax.vmap(lambda i, c: jax.random.fold_in(jax.random.fold_in(base, i), c))(
          batch["example_id"], copy)
    # Keyed by example id, not batch position: the same mask whatever the sharding or
    # gradient-accumulation split of the batch.
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["example_id"])

  def corrupt(self, batch, key):
    masked = mask_batch(
        self.example_keys(batch, key), batch["input_ids"], batch["word_ids"],
        batch["attention_mask"], self.masking, mask_id=self.special.mask,
        first_regular_id=self.special.first_regular, vocab_size=self.special.vocab_size)
    out = dict(batch)
    out["original_ids"] = batch["input_ids"]
    out.update(masked)
    return out

  def head(self, encoder_config, name):
    return MLMHeadOnPositions(encoder_config, predict_all=self.predict_all, name=name)

  def loss(self, outputs, batch):
    return masked_lm_loss(outputs, batch["mlm_ids"], batch["mlm_weights"],
                          self.special.vocab_size)
