"""Masked language modelling (BERT, RoBERTa; ALBERT n-grams; SpanBERT spans; PMI-masking).

Corruption is `objectives.masking` (80/10/10 by default), made as the `MaskedView`: every
objective that reads the masked input (NSP, SOP and distillation too, as in BERT) declares
an equal view, so it is masked and encoded once. Parameters: params["mlm"]["head"].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import objectives
from bert_jax import heads
from objectives import pmi
from objectives.base import Feature, Objective, SpecialIds, View
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


def gather_logits(logits_BxLxV, batch):
  """[B, L, V] -> [B, P, V] at batch["mlm_positions"]."""
  return jnp.take_along_axis(logits_BxLxV, batch["mlm_positions"][..., None], axis=1)


class MLMHeadOnPositions(nn.Module):
  """The MLM head applied at the gathered masked positions (or at every position)."""

  cfg: Any
  predict_all: bool = False
  gather: bool = True  # False: the logits at every position, [B, L, V] (distillation's KL)

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del deterministic
    head = heads.MLMHead(self.cfg, name="head")
    hidden = encoded["hidden_states"]
    if self.predict_all or not self.gather:  # vocabulary logits everywhere (then gather)
      logits = head(hidden, encoder)
      if not self.gather:
        return logits
      return gather_logits(logits, batch)
    return head(heads.gather_positions(hidden, batch["mlm_positions"]), encoder)


class VocabularyLogits(nn.Module):
  """The MLM head at every position (transformers' *ForMaskedLM logits [B, L, V]):
  params[name]["head"], as MLMHeadOnPositions lays it out."""

  cfg: Any

  @nn.compact
  def __call__(self, hidden, encoder, *, deterministic: bool):
    del deterministic
    return {"logits": heads.MLMHead(self.cfg, name="head")(hidden, encoder)}


@dataclasses.dataclass(frozen=True)
class MLMConfig:
  """config.mlm: BERT's recipe (15%, 80/10/10, at most max_predictions per sequence)."""

  rate: float = 0.15
  max_predictions: int = 20  # presets: max(20, round(0.15 * seq_len + 0.5))
  mask_prob: float = 0.8
  random_prob: float = 0.1
  whole_word: bool = False
  span: str = "none"  # none | ngram (ALBERT, n <= max_ngram, p(n) ~ 1/n) | geometric (SpanBERT)
  max_ngram: int = 3
  span_p: float = 0.2
  max_span: int = 10
  truncate_spans: bool = False  # ALBERT's n-grams near a stretch's end: truncated (albert preset)
  replace_with: str = "mask"  # mask | unk: the token of the masked branch ([MASK] or [UNK])
  static: bool = False  # BERT's offline masks: at most dupe_factor different masks per example
  dupe_factor: int = 10
  predict_all: bool = False  # vocabulary logits at every position, then gather (slower)
  # PMI-masking (Levine et al. 2021, objectives/pmi.py): whole collocations as units, from
  # the training corpus' word n-grams of length <= pmi_max_n seen > pmi_min_count times.
  pmi: bool = False
  pmi_max_n: int = 5
  pmi_min_count: int = 10
  pmi_vocab_size: int = 800_000
  # DistilBERT's mlm_smoothing (its preset: 0.7): positions drawn with weights count^-s by
  # the token's count in the training split (0: uniform, BERT).
  smoothing: float = 0.0

  def __post_init__(self):
    if self.dupe_factor < 1:
      raise ValueError(f"mlm.dupe_factor must be >= 1, got {self.dupe_factor}")
    if self.pmi and self.span != "none":
      raise ValueError(f"mlm.pmi=True with mlm.span={self.span!r}: PMI-masking draws whole "
                       "collocations as its units; set mlm.span='none'")

  def masking(self) -> MaskingConfig:
    return MaskingConfig(
        rate=self.rate, max_predictions=self.max_predictions, mask_prob=self.mask_prob,
        random_prob=self.random_prob, whole_word=self.whole_word or self.pmi, span=self.span,
        max_ngram=self.max_ngram, span_p=self.span_p, max_span=self.max_span,
        truncate_spans=self.truncate_spans, replace_with=self.replace_with,
        smoothing=self.smoothing)


def _prepare_counts(context):
  """Feature "token_counts": each position's token count in the training split (0 for
  [CLS], [SEP], padding and tokens it lacks), for DistilBERT's smoothed masking."""
  counts = np.minimum(np.bincount(context.statistics_corpus().ids), np.iinfo(np.int32).max)

  def make(example, offsets):
    ids = np.asarray(example["input_ids"])
    known = (offsets >= 0) & (ids < len(counts))
    return np.where(known, counts[np.minimum(ids, len(counts) - 1)], 0)
  return make


TOKEN_COUNTS = Feature("token_counts", _prepare_counts)


@dataclasses.dataclass(frozen=True)
class MaskedView(View):
  """BERT's masked input: input_ids with the chosen positions corrupted, and the targets
  mlm_positions / mlm_ids / mlm_weights. Dynamic masking (RoBERTa, the default) draws a
  fresh mask from the step's key; static masking (BERT's offline dupe_factor copies) keys
  it by the example's id and its epoch modulo dupe_factor."""

  name = "masked"

  masking: MaskingConfig
  special: SpecialIds
  static: bool = False
  dupe_factor: int = 10
  seed: int = 0
  units: Feature | None = None  # a host-side field of masking units (PMI), else words
  counts: Feature | None = None  # the tokens' corpus counts (smoothing)

  @classmethod
  def from_config(cls, config, special) -> "MaskedView":
    """The view config.mlm describes (also what NSP, SOP and distillation read)."""
    c = MaskedLM.section(config)
    units = pmi.units_feature(c.pmi_max_n, c.pmi_min_count, c.pmi_vocab_size) if c.pmi else None
    counts = TOKEN_COUNTS if c.smoothing > 0 else None
    return cls(c.masking(), special, c.static, c.dupe_factor, config.seed, units, counts)

  @property
  def features(self):
    return tuple(f for f in (self.units, self.counts) if f is not None)

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

  def make(self, clean, key):
    units = clean[self.units.name] if self.units is not None else clean["word_ids"]
    return mask_batch(
        self.example_keys(clean, key), clean["input_ids"], units,
        clean["attention_mask"], self.masking,
        mask_id=self.special.unk if self.masking.replace_with == "unk" else self.special.mask,
        first_regular_id=self.special.first_regular, vocab_size=self.special.vocab_size,
        token_counts=clean[self.counts.name] if self.counts is not None else None)


@objectives.register
@dataclasses.dataclass(frozen=True)
class MaskedLM(Objective):
  name = "mlm"
  Config = MLMConfig

  masked: MaskedView
  predict_all: bool = False

  @classmethod
  def from_config(cls, config, special):
    return cls(MaskedView.from_config(config, special), cls.section(config).predict_all)

  @property
  def special(self) -> SpecialIds:
    return self.masked.special

  @classmethod
  def for_seq_len(cls, config, seq_len):
    c = config[cls.name]
    c.max_predictions = max(20, round(seq_len * c.rate + 0.5))

  def view(self):
    return self.masked

  def torch_peer(self):
    return "objectives.torch_peers:bert"

  hf_head_kind = "mlm"
  fills_masks = True

  @classmethod
  def hf_head(cls, encoder_config, name):
    return VocabularyLogits(encoder_config, name=name)

  def head(self, encoder_config, name):
    return MLMHeadOnPositions(encoder_config, predict_all=self.predict_all, name=name)

  def loss(self, outputs, inputs):
    return masked_lm_loss(outputs, inputs["mlm_ids"], inputs["mlm_weights"],
                          self.special.vocab_size)
