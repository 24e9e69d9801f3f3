"""Sentence-order prediction (ALBERT): are the two consecutive segments in order?

Label 1 = A and B were swapped (50% of pairs); both segments always come from the same
document, so topic cues do not give the answer away as they do for NSP.
"""

from __future__ import annotations

import dataclasses

import objectives
from objectives.base import ExampleKind
from objectives.pair import SentencePairObjective


@objectives.register
@dataclasses.dataclass(frozen=True)
class SentenceOrderPrediction(SentencePairObjective):
  name = "sop"
  example_kind = ExampleKind("sop", segments=2, negative="swap")
