"""ERNIE 2.0's sentence reordering task (Sun et al. 2020): a paragraph is split into
n = 1..m segments (n uniform), shuffled, and the model classifies the permutation among
k = sum_{n=1}^{m} n! classes (m = 3: 9 classes).

Examples are planned by `ReorderPlanner` (host-side, declared here): BERT's chunks of
whole sentences of one document (target seq_len - 1 - m), cut into n segments at random
sentence boundaries (at random word starts when the chunk has fewer than n sentences),
the segments put in a uniformly random order, each followed by [SEP], segment ids
alternating 0, 1, 0. Label: offset(n) + the permutation's index in lexicographic order
(offset(n) = sum of j! for j < n); 0 is one segment. Head: pooler + dense(k) on [CLS], on
the MLM-masked input (`input: clean`: the clean one).

Departures: ERNIE 2.0 does not publish m (we use 3) nor where paragraphs are cut;
chunks too short to cut into n pieces are dropped. Chance: 1/m by the majority class
(0.33 for m = 3); a model that only counts the [SEP]s reaches (1/m) sum_n 1/n! = 0.56.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

import objectives
from bert_jax.data import examples as ex
from objectives.base import ExampleKind
from objectives.pair import PairConfig, SentencePairObjective


@dataclasses.dataclass(frozen=True)
class SROConfig(PairConfig):
  """config.sro."""

  max_segments: int = 3

  def __post_init__(self):
    super().__post_init__()
    if not 1 <= self.max_segments <= 5:
      raise ValueError(f"sro.max_segments must be in 1..5, got {self.max_segments}")


def num_classes_for(m: int) -> int:
  return sum(math.factorial(n) for n in range(1, m + 1))


def label_of(perm) -> int:
  n = len(perm)
  offset = sum(math.factorial(j) for j in range(1, n))
  return offset + list(itertools.permutations(range(n))).index(tuple(perm))


@dataclasses.dataclass(frozen=True)
class ReorderPlanner:
  max_segments: int

  def __call__(self, corpus, seq_len, rng, short_seq_prob):
    m = self.max_segments
    off = corpus.sent_offsets
    target = seq_len - 1 - m
    out = []
    for _, s0, s1 in ex.document_chunks(corpus, target, rng, short_seq_prob):
      n = int(rng.integers(1, m + 1))
      span = [int(off[s0]), int(off[s1])]
      ex.truncate_parts([span], target, rng)
      inner = [int(o) for o in off[s0 + 1:s1] if span[0] < o < span[1]]
      if len(inner) < n - 1:
        inner = (np.flatnonzero(corpus.word_start[span[0] + 1:span[1]]) + span[0] + 1).tolist()
      if len(inner) < n - 1:
        inner = list(range(span[0] + 1, span[1]))
      if len(inner) < n - 1:
        continue
      cuts = sorted(rng.choice(inner, size=n - 1, replace=False).tolist()) if n > 1 else []
      bounds = [span[0], *cuts, span[1]]
      pieces = list(zip(bounds[:-1], bounds[1:]))
      perm = rng.permutation(n).tolist()
      out.append(([(pieces[p][0], pieces[p][1], i % 2) for i, p in enumerate(perm)],
                  label_of(perm)))
    return out


@objectives.register
@dataclasses.dataclass(frozen=True)
class SentenceReordering(SentencePairObjective):
  name = "sro"
  Config = SROConfig

  max_segments: int = 3

  @classmethod
  def from_config(cls, config, special):
    c = cls.section(config)
    base = super().from_config(config, special)
    return dataclasses.replace(base, max_segments=c.max_segments)

  @property
  def example_kind(self):
    m = self.max_segments
    return ExampleKind(f"sro{m}", segments=m, planner=ReorderPlanner(m))

  @property
  def num_classes(self):
    return num_classes_for(self.max_segments)
