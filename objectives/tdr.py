"""ERNIE 2.0's token-document relation prediction (Sun et al. 2020): does this token occur
in another segment of the same document?

The label needs what the example does not hold, so the builder adds it host-side: the
`Feature` "tdr_labels" this file declares gives every regular token 1 if the same token
id occurs in its document outside the example's tokens (the rest of that document), 0 if
not, -1 for [CLS], [SEP] and padding. Head: dense + activation + dense(1) per token;
sigmoid CE at every regular token, on the MLM-masked input (the pass MLM makes; `input:
clean`: the clean one). Chance: the majority class of the corpus' labels (measured by
tests/test_variants.py on the bundled corpus).

Departures: ERNIE 2.0 works on words (Chinese characters/words); here tokens. A document
that fits wholly in the example has no other segment: all its tokens are 0
(`data.packing="doc_sentences"` keeps documents apart; long documents give the task its
signal).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import objectives
from objectives.base import CLEAN, ExampleKind, Feature, Objective, SpecialIds
from objectives.cap import TokenLogits
from objectives.mlm import MaskedView
from objectives.pair import PairConfig
from objectives.rtd import discriminator_loss


def _prepare(context):
  corpus = context.corpus
  doc_tokens = corpus.doc_token_offsets
  ids = corpus.ids

  def make(example, offsets):
    labels = np.full(offsets.shape, -1, np.int32)
    real = offsets >= 0
    docs = np.searchsorted(doc_tokens, offsets, side="right") - 1
    for d in np.unique(docs[real]):
      d0, d1 = int(doc_tokens[d]), int(doc_tokens[d + 1])
      rest = np.ones(d1 - d0, bool)
      inside = offsets[real & (docs == d)]
      rest[inside - d0] = False
      sel = real & (docs == d)
      labels[sel] = np.isin(ids[offsets[sel]], ids[d0:d1][rest])
    return labels
  return make


LABELS = Feature("tdr_labels", _prepare, fill=-1)


@objectives.register
@dataclasses.dataclass(frozen=True)
class TokenDocumentRelation(Objective):
  name = "tdr"
  Config = PairConfig  # input: masked | clean
  example_kind = ExampleKind("single", features=(LABELS,))

  masked: MaskedView | None = None

  @classmethod
  def from_config(cls, config, special: SpecialIds):
    c = cls.section(config)
    return cls(MaskedView.from_config(config, special) if c.input == "masked" else None)

  def view(self):
    return self.masked if self.masked is not None else CLEAN

  def head(self, encoder_config, name):
    return TokenLogits(encoder_config, name=name)

  def loss(self, outputs, inputs):
    labels = inputs["tdr_labels"]
    return discriminator_loss(outputs, labels.clip(0), labels >= 0)
