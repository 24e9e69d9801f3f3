"""StructBERT's word structural objective (Wang et al. 2020): shuffle random trigrams of
the unmasked tokens and predict the original token at every shuffled position.

Recipe (defaults): 5% of the trigrams (about 0.05 * n trigrams, 15% of the tokens) chosen
among tokens MLM left unmasked, shuffled within each trigram, predicted with a vocabulary
head tied to the word embeddings (params["wso"]["head"], laid out as MLM's). On device.

Departures, on purpose:
  * The shuffled input is the `ShuffledView`: its own MLM masking (config.mlm, another key)
    with the trigrams shuffled on top, encoded once for WSO. StructBERT has one input with
    both the masks and the shuffles, on which MLM is also scored; beside `mlm` here each
    loss reads its own pass (so each is what it gives alone). `input: clean` shuffles the
    clean tokens instead.
  * Trigrams sit on a grid with a random phase per sequence (slots phase + 3k, each chosen
    with probability 3 * rate when its three tokens are eligible): non-overlapping and
    jittable; at most `max_ngrams` per sequence.
  * A shuffle is one of the 5 non-identity permutations (uniform): every chosen trigram is
    reordered, so copying the input is right at 1/5 of the positions (a permutation's
    fixed points), not at all of them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import objectives
from bert_jax import heads
from objectives.base import Objective, SpecialIds, View
from objectives.mlm import MaskedView, masked_lm_loss

INPUTS = ("masked", "clean")


@dataclasses.dataclass(frozen=True)
class WSOConfig:
  """config.wso: StructBERT's word structural objective."""

  rate: float = 0.05  # trigrams shuffled, as a fraction of the sequence's tokens
  ngram: int = 3
  max_ngrams: int = 13  # per sequence; presets: for_seq_len
  input: str = "masked"  # masked: shuffle unmasked tokens of an MLM-masked input | clean

  def __post_init__(self):
    if self.input not in INPUTS:
      raise ValueError(f"wso.input: {self.input!r} is not one of {INPUTS}")
    if not 0 < self.rate * self.ngram <= 1:
      raise ValueError(f"wso.rate * wso.ngram must be in (0, 1], got {self.rate * self.ngram}")
    if self.ngram < 2 or self.max_ngrams < 1:
      raise ValueError("wso.ngram must be >= 2 and wso.max_ngrams >= 1")


def max_ngrams_for(seq_len: int, rate: float, ngram: int) -> int:
  """Mean + 3 standard deviations of the chosen slots of a full sequence."""
  slots, p = seq_len / ngram, rate * ngram
  return max(1, math.ceil(slots * p + 3 * math.sqrt(slots * p * (1 - p))))


def shuffle_ngrams(key, ids, eligible, *, rate: float, ngram: int, max_ngrams: int):
  """One sequence: (shuffled ids [L], positions [K*n], weights [K*n])."""
  (length,) = ids.shape
  n = ngram
  perms = np.array([p for p in itertools.permutations(range(n)) if p != tuple(range(n))],
                   np.int32)
  k_phase, k_pick, k_perm = jax.random.split(key, 3)
  slots = length // n + 1
  start = jax.random.randint(k_phase, (), 0, n) + n * jnp.arange(slots)  # [S]
  pos = start[:, None] + jnp.arange(n)  # [S, n]
  inside = pos < length
  ok = jnp.all(inside & eligible[jnp.minimum(pos, length - 1)], axis=1)
  chosen = ok & (jax.random.uniform(k_pick, (slots,)) < rate * n)
  (picked,) = jnp.nonzero(chosen, size=max_ngrams, fill_value=slots)
  valid = picked < slots  # [K]
  pos = jnp.where(valid[:, None], start[jnp.minimum(picked, slots - 1)][:, None] + jnp.arange(n),
                  length)  # [K, n]; invalid rows point past the end (dropped)
  perm = jnp.asarray(perms)[jax.random.randint(k_perm, (max_ngrams,), 0, perms.shape[0])]
  src = jnp.take_along_axis(pos, perm, axis=1)
  shuffled = ids.at[pos].set(ids[jnp.minimum(src, length - 1)], mode="drop")
  weights = jnp.repeat(valid, n).astype(jnp.float32)
  return shuffled, jnp.where(weights > 0, pos.reshape(-1), 0), weights


@dataclasses.dataclass(frozen=True)
class ShuffledView(View):
  """input_ids with trigrams shuffled (over an MLM-masked input, or the clean one), and
  the targets wso_positions / wso_ids (the clean tokens there) / wso_weights."""

  name = "shuffled"

  rate: float
  ngram: int
  max_ngrams: int
  masked: MaskedView | None

  def make(self, clean, key):
    mask_key, shuffle_key = jax.random.split(key)
    ids = clean["input_ids"]
    eligible = (clean["attention_mask"] > 0) & (clean["word_ids"] >= 0)
    if self.masked is not None:
      base = self.masked.make(clean, mask_key)
      ids, eligible = base["input_ids"], eligible & ~base["mlm_mask"]
    keys = jax.vmap(lambda i: jax.random.fold_in(shuffle_key, i))(clean["example_id"])
    one = lambda k, x, e: shuffle_ngrams(k, x, e, rate=self.rate, ngram=self.ngram,  # noqa: E731
                                         max_ngrams=self.max_ngrams)
    shuffled, positions, weights = jax.vmap(one)(keys, ids, eligible)
    return {"input_ids": shuffled.astype(jnp.int32), "wso_positions": positions.astype(jnp.int32),
            "wso_ids": jnp.take_along_axis(clean["input_ids"], positions, axis=1),
            "wso_weights": weights}


class WSOHead(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del deterministic
    hidden = heads.gather_positions(encoded["hidden_states"], batch["wso_positions"])
    return heads.MLMHead(self.cfg, name="head")(hidden, encoder)


@objectives.register
@dataclasses.dataclass(frozen=True)
class WordStructure(Objective):
  name = "wso"
  Config = WSOConfig

  shuffled: ShuffledView
  special: SpecialIds

  @classmethod
  def from_config(cls, config, special):
    c = cls.section(config)
    masked = MaskedView.from_config(config, special) if c.input == "masked" else None
    return cls(ShuffledView(c.rate, c.ngram, c.max_ngrams, masked), special)

  @classmethod
  def for_seq_len(cls, config, seq_len):
    c = config[cls.name]
    c.max_ngrams = max_ngrams_for(seq_len, c.rate, c.ngram)

  def view(self):
    return self.shuffled

  def head(self, encoder_config, name):
    return WSOHead(encoder_config, name=name)

  def loss(self, outputs, inputs):
    return masked_lm_loss(outputs, inputs["wso_ids"], inputs["wso_weights"],
                          self.special.vocab_size)
