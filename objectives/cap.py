"""ERNIE 2.0's capitalization prediction (Sun et al. 2020): is the word capitalized?

ERNIE 2.0's English model reads uncased text and predicts, per word, whether it was
capitalized. With a cased tokenizer that means hiding the case from the encoder: the
builder adds two host-side fields (the `Feature`s this file declares, computed from the
tokenizer's pieces): `cap_labels` (at each word's first piece with a letter: 1 if that
letter is uppercase, 0 if lowercase; -1 elsewhere, and -1 where the piece has no
lowercase twin in the vocabulary, since its case could not be hidden) and `uncased_ids`
(each piece replaced by its lowercase twin where the vocabulary has one). The default
input is the `UncasedView` (the uncased ids, one encoder pass of their own); with
`input: masked` the head reads MLM's masked pass instead and is scored only where the
token was replaced ([MASK] or a random token), where its case is hidden too.

Head: dense + activation + dense(1) per token (ELECTRA's discriminator head layout);
sigmoid CE at the labelled positions. Chance: the majority class (not capitalized),
about 0.83 of the labelled words on the bundled corpus.

Departures: the uncased input maps pieces one to one (a lowercased text would sometimes
tokenize differently); a word is a piece starting with the word-boundary marker (a bare
marker passes the word start to the next piece).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np

import objectives
from bert_jax import heads
from objectives.base import ExampleKind, Feature, Objective, SpecialIds, View
from objectives.mlm import MaskedView
from objectives.rtd import discriminator_loss

MARKER = "\u2581"
INPUTS = ("uncased", "masked")


def case_tables(pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(case [V]: 1 upper / 0 lower / -1 no letter or no lowercase twin, uncased id [V])."""
  index = {p: i for i, p in enumerate(pieces)}
  case = np.full(len(pieces), -1, np.int32)
  uncased = np.arange(len(pieces), dtype=np.int32)
  for i, p in enumerate(pieces):
    letters = [ch for ch in p if ch.isalpha()]
    lower = index.get(p.lower())
    if lower is not None:
      uncased[i] = lower
    if not letters:
      continue
    if letters[0].isupper():
      case[i] = 1 if lower is not None else -1
    elif letters[0].islower():
      case[i] = 0
  return case, uncased


def _prepare_labels(context):
  pieces = context.tokenizer.pieces()
  case, _ = case_tables(pieces)
  bare = np.array([p == MARKER for p in pieces])
  word_start = context.corpus.word_start

  def make(example, offsets):
    ids = example["input_ids"]
    real = offsets >= 0
    starts = real & word_start[np.maximum(offsets, 0)]
    after_bare = np.concatenate([[False], bare[ids[:-1]]]) & real
    return np.where(starts | after_bare, case[ids], -1)
  return make


def _prepare_uncased(context):
  _, uncased = case_tables(context.tokenizer.pieces())

  def make(example, offsets):
    return np.where(offsets >= 0, uncased[example["input_ids"]], example["input_ids"])
  return make


LABELS = Feature("cap_labels", _prepare_labels, fill=-1)
UNCASED = Feature("uncased_ids", _prepare_uncased)


@dataclasses.dataclass(frozen=True)
class CapConfig:
  """config.cap."""

  input: str = "uncased"  # uncased: the uncased ids (ERNIE's uncased model) | masked

  def __post_init__(self):
    if self.input not in INPUTS:
      raise ValueError(f"cap.input: {self.input!r} is not one of {INPUTS}")


@dataclasses.dataclass(frozen=True)
class UncasedView(View):
  name = "uncased"

  def make(self, clean, key):
    del key
    return {"input_ids": clean["uncased_ids"]}


class TokenLogits(nn.Module):
  cfg: Any

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del batch, encoder, deterministic
    return heads.DiscriminatorHead(self.cfg, name="head")(encoded["hidden_states"])


@objectives.register
@dataclasses.dataclass(frozen=True)
class Capitalization(Objective):
  name = "cap"
  Config = CapConfig
  example_kind = ExampleKind("single", features=(LABELS, UNCASED))

  masked: MaskedView | None = None  # None: the uncased view

  @classmethod
  def from_config(cls, config, special: SpecialIds):
    c = cls.section(config)
    return cls(MaskedView.from_config(config, special) if c.input == "masked" else None)

  def view(self):
    return self.masked if self.masked is not None else UncasedView()

  def head(self, encoder_config, name):
    return TokenLogits(encoder_config, name=name)

  def loss(self, outputs, inputs):
    labels = inputs["cap_labels"]
    weights = labels >= 0
    if self.masked is not None:  # only where the token is hidden
      weights = weights & (inputs["input_ids"] != inputs["original_ids"])
    return discriminator_loss(outputs, labels.clip(0), weights)
