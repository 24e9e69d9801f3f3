"""StructBERT's sentence structural objective (Wang et al. 2020): is segment B the next
segment of A, the previous one, or one from another document? (3 classes, 1/3 each.)

Examples are planned by `plan_structural` (declared in this file, run host-side by the
builder): BERT's chunks of whole sentences (target length seq_len - 3, shorter with
probability data.short_seq_prob), split at a random sentence boundary into X then Y;
label 0 = (X, Y), 1 = (Y, X) (B precedes A), 2 = (X, sentences of a random other
document from a random sentence on). Head: pooler + dense(3) on [CLS], on the MLM-masked
input (as StructBERT trains it beside MLM) or, with `input: clean`, the clean one.

Departures: as the NSP/SOP builder here, a one-sentence chunk is cut at a random word
start (a one-token one is dropped), the random document is drawn among the others, and the
sentences a random B leaves unused are not put back. Chance: 1/3.
"""

from __future__ import annotations

import dataclasses


import objectives
from bert_jax.data import examples as ex
from objectives.base import ExampleKind
from objectives.pair import SentencePairObjective


def split_chunk(corpus, s0: int, s1: int, rng) -> tuple[list[int], list[int]] | None:
  """Chunk sentences [s0, s1) -> (X, Y) token spans cut at a random sentence boundary (a
  random word start of a one-sentence chunk); None for a one-token chunk."""
  off = corpus.sent_offsets
  if s1 - s0 > 1:
    cut = int(off[s0 + int(rng.integers(1, s1 - s0))])
  else:
    cut = ex._split_sentence(int(off[s0]), int(off[s1]), corpus.word_start, rng)
    if cut is None:
      return None
  return [int(off[s0]), cut], [cut, int(off[s1])]


def random_document_span(corpus, d: int, length: int, rng) -> list[int]:
  """Sentences of a random document other than d, from a random one on, up to `length`."""
  doc_off, off = corpus.doc_offsets, corpus.sent_offsets
  r = int(rng.integers(0, corpus.num_documents - 1))
  r += r >= d
  j = int(rng.integers(doc_off[r], doc_off[r + 1]))
  span = [int(off[j]), int(off[j + 1])]
  while span[1] - span[0] < length and j + 1 < doc_off[r + 1]:
    j += 1
    span[1] = int(off[j + 1])
  return span


def plan_structural(corpus, seq_len, rng, short_seq_prob):
  if corpus.num_documents < 2:
    raise ValueError("SSO needs at least 2 documents to draw random segments")
  out = []
  for d, s0, s1 in ex.document_chunks(corpus, seq_len - 3, rng, short_seq_prob):
    pair = split_chunk(corpus, s0, s1, rng)
    if pair is None:
      continue
    x, y = pair
    label = int(rng.integers(0, 3))
    if label == 1:
      x, y = y, x
    elif label == 2:
      y = random_document_span(corpus, d, seq_len - 3 - (x[1] - x[0]), rng)
    ex.truncate_parts([x, y], seq_len - 3, rng)
    out.append(([(x[0], x[1], 0), (y[0], y[1], 1)], label))
  return out


@objectives.register
@dataclasses.dataclass(frozen=True)
class SentenceStructure(SentencePairObjective):
  name = "sso"
  example_kind = ExampleKind("sso", segments=2, planner=plan_structural)
  num_classes = 3
