"""Next-sentence prediction (BERT): is segment B the true continuation of A?

Label 1 = B was taken from a random other document (50% of pairs), built host-side by
`bert_jax.data.examples` following BERT's create_instances_from_document.
"""

from __future__ import annotations

import dataclasses

import objectives
from objectives.base import ExampleKind
from objectives.pair import SentencePairObjective


@objectives.register
@dataclasses.dataclass(frozen=True)
class NextSentencePrediction(SentencePairObjective):
  name = "nsp"
  example_kind = ExampleKind("nsp", segments=2, negative="random_document")
