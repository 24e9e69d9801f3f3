"""ERNIE 2.0's sentence distance task (Sun et al. 2020): are the two segments adjacent in
one document (0), in the same document but not adjacent (1), or from two documents (2)?

Examples are planned by `plan_distance` (host-side, declared here): BERT's chunks of whole
sentences (target seq_len - 3) give A, the chunk's first sentences (cut at a random
sentence boundary, or a word start of a one-sentence chunk); label drawn 1/3 each:
0 = B is the rest of the chunk; 1 = B starts at a sentence of the same document at least
one sentence after A's end, or is a run that ends at least one sentence before A's start;
2 = B from a random other document. Head: pooler + dense(3) on [CLS], on the MLM-masked
input (`input: clean`: the clean one).

Departures: ERNIE 2.0 does not publish the proportions (we use 1/3 each) nor how far
"not adjacent" is (here: one sentence or more in between). A document with no room for a
non-adjacent B gives label 0 or 2 instead (counted in the plan's label fractions).
Chance: 1/3 (majority class of the plan, about 0.35 on the bundled corpus).
"""

from __future__ import annotations

import dataclasses

import objectives
from bert_jax.data import examples as ex
from objectives.base import ExampleKind
from objectives.pair import SentencePairObjective
from objectives.sso import random_document_span, split_chunk


def same_document_span(corpus, d: int, a_first: int, a_end: int, length: int, rng):
  """A run of sentences of document d not adjacent to sentences [a_first, a_end), up to
  `length` tokens; None if the document has no room for one."""
  doc_off, off = corpus.doc_offsets, corpus.sent_offsets
  s0, s1 = int(doc_off[d]), int(doc_off[d + 1])
  after = list(range(a_end + 1, s1))
  before = list(range(s0, a_first - 1))  # runs that end before sentence a_first - 1
  starts = after + before
  if not starts:
    return None
  j = starts[int(rng.integers(0, len(starts)))]
  limit = s1 if j > a_end else a_first - 1
  span = [int(off[j]), int(off[j + 1])]
  while span[1] - span[0] < length and j + 1 < limit:
    j += 1
    span[1] = int(off[j + 1])
  return span


def plan_distance(corpus, seq_len, rng, short_seq_prob):
  if corpus.num_documents < 2:
    raise ValueError("SDP needs at least 2 documents")
  off = corpus.sent_offsets
  out = []
  for d, s0, s1 in ex.document_chunks(corpus, seq_len - 3, rng, short_seq_prob):
    pair = split_chunk(corpus, s0, s1, rng)
    if pair is None:
      continue
    a, b = pair
    # A's sentences: [s0, a_end) (a cut inside one sentence counts as that sentence).
    a_end = s0 + max(1, int((off[s0:s1 + 1] <= a[1]).sum()) - 1)
    label = int(rng.integers(0, 3))
    room = seq_len - 3 - (a[1] - a[0])
    if label == 1:
      b = same_document_span(corpus, d, s0, a_end, room, rng)
      if b is None:
        label = 0 if rng.random() < 0.5 else 2
        b = pair[1]
    if label == 2:
      b = random_document_span(corpus, d, room, rng)
    ex.truncate_parts([a, b], seq_len - 3, rng)
    out.append(([(a[0], a[1], 0), (b[0], b[1], 1)], label))
  return out


@objectives.register
@dataclasses.dataclass(frozen=True)
class SentenceDistance(SentencePairObjective):
  name = "sdp"
  example_kind = ExampleKind("sdp", segments=2, planner=plan_distance)
  num_classes = 3
