"""Example builders: fixed-length model inputs cut out of a :class:`TokenizedCorpus`.

Building is split in two: a *plan*, computed once with numpy from a seed, records for
every example the token spans it is made of (so the set of examples is static, as in
BERT's offline data generation); :func:`make_example` then assembles example ``i`` from
the plan by random access. :class:`Examples` bundles both as a sequence for grain.

Two kinds of examples:

- **single** (:func:`plan_single`): ``[CLS] tokens [SEP] [PAD]...``, consecutive whole
  sentences packed up to ``seq_len - 2`` tokens (RoBERTa's FULL-SENTENCES; a [SEP] marks
  each document boundary inside an example), or never crossing a document
  (``packing="doc_sentences"``, DOC-SENTENCES). A sentence longer than ``seq_len - 2`` is
  cut into chunks.
- **pair** (:func:`plan_pairs`): ``[CLS] A [SEP] B [SEP] [PAD]...`` with a
  ``sentence_label``, for NSP (BERT) and SOP (ALBERT), following BERT's
  ``create_instances_from_document`` (see :func:`plan_pairs` for where we depart).

- **planned segments** (:func:`plan_segments`): ``[CLS] S0 [SEP] S1 [SEP] ... [PAD]...``
  with a ``sentence_label``, for kinds whose objective declares its own host-side planner
  (``ExampleKind.planner``: StructBERT's previous/next/random, ERNIE 2.0's reordering and
  distance); the builder only checks, assembles and records what the planner returns.

Objectives may also ask, through ``ExampleKind.features``, for host-side fields that the
builder adds to every example (:class:`FeatureContext` is what they read).

Every example is a dict of numpy arrays, ``L = seq_len``:

- ``input_ids`` int32 [L]
- ``segment_ids`` int32 [L]: 0 for [CLS] A [SEP], 1 for B [SEP]; padding 0.
- ``attention_mask`` int32 [L]: 1 for real tokens (specials included), 0 for padding.
- ``word_ids`` int32 [L]: index of the word a token belongs to, 0, 1, 2... in order; a
  word starts at a word-start piece, at each sentence start and at the start of each
  segment or span. -1 for [CLS], [SEP] and [PAD].
- ``example_id`` int32 []: the example's index in the (unshuffled) plan.
- ``sentence_label`` int32 [] (pair examples only): NSP 1 = B is random; SOP 1 = swapped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from bert_jax.data.corpus import TokenizedCorpus

if TYPE_CHECKING:  # the objectives declare the kind; examples only read its fields
    from objectives.base import ExampleKind


class SpecialIds(Protocol):
    """The ids an example builder inserts (a :class:`~bert_jax.data.tokenizer.Tokenizer`
    has them)."""

    @property
    def cls_id(self) -> int: ...

    @property
    def sep_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

PACKINGS: tuple[str, ...] = ("full_sentences", "doc_sentences")
# How label 1 of a pair is made (`ExampleKind.negative`): B from another document (NSP),
# or A and B swapped (SOP).
NEGATIVES: tuple[str, ...] = ("random_document", "swap")


@dataclasses.dataclass(frozen=True)
class SinglePlan:
    """Plan of single-segment examples.

    Attributes:
      spans: int64 [N, 2], example ``i`` holds ``corpus.ids[spans[i, 0]:spans[i, 1]]``
        (token offsets; a [SEP] is inserted at each document boundary strictly inside).
      seq_len: the example length L.
      packing: "full_sentences" or "doc_sentences".
      split_sentences: sentences longer than L - 2 that were cut into chunks.
    """

    spans: np.ndarray
    seq_len: int
    packing: str
    split_sentences: int

    def __len__(self) -> int:
        return int(self.spans.shape[0])

    @property
    def kind(self) -> str:
        return "single"


@dataclasses.dataclass(frozen=True)
class PairPlan:
    """Plan of segment-pair examples (NSP or SOP).

    Attributes:
      a_spans: int64 [N, 2], token offsets of segment A (after truncation and, for SOP
        negatives, after the swap: A is what comes first in the example).
      b_spans: int64 [N, 2], token offsets of segment B.
      labels: int32 [N], the ``sentence_label``.
      target_lengths: int32 [N], the target length the example's chunk was built for
        (``seq_len - 3``, or shorter with probability ``short_seq_prob``).
      kind: the kind's name (e.g. "nsp", "sop"; what logs and stats call it).
      seq_len: the example length L.
      forced_random: NSP examples given a random B because their chunk was a single
        one-token sentence (nothing to continue).
      split_sentences: examples whose chunk was a single sentence, cut in two inside it.
      dropped_chunks: SOP chunks of a single one-token sentence (no pair possible).
    """

    a_spans: np.ndarray
    b_spans: np.ndarray
    labels: np.ndarray
    target_lengths: np.ndarray
    kind: str
    seq_len: int
    forced_random: int = 0
    split_sentences: int = 0
    dropped_chunks: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class SegmentsPlan:
    """Plan of examples made of planned segments (an objective's ``ExampleKind.planner``).

    Attributes:
      spans: int64 [M, 2], token offsets of every segment of every example, in order.
      segments: int32 [M], the segment id of each span.
      offsets: int64 [N + 1], example ``i`` holds spans ``offsets[i]:offsets[i + 1]``.
      labels: int32 [N], the ``sentence_label``.
      kind: the kind's name; seq_len: the example length L.
    """

    spans: np.ndarray
    segments: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    kind: str
    seq_len: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])


Plan = SinglePlan | PairPlan | SegmentsPlan


@dataclasses.dataclass(frozen=True)
class FeatureContext:
    """What an objective's host-side ``Feature.prepare`` reads: the corpus and the
    tokenizer (``tokenizer.pieces()``: the vocabulary by id); ``train_corpus`` loads the
    training split's corpus, where corpus-wide statistics (PMI's n-gram counts) come from
    for every split (None: ``corpus`` is the training split)."""

    corpus: TokenizedCorpus
    tokenizer: object
    train_corpus: Callable[[], TokenizedCorpus] | None = None

    def statistics_corpus(self) -> TokenizedCorpus:
        """The corpus that statistics are counted on: the training split's."""
        return self.train_corpus() if self.train_corpus is not None else self.corpus


def _check_seq_len(seq_len: int, specials: int) -> None:
    if seq_len < specials + 2:
        raise ValueError(f"seq_len={seq_len} is too short (needs at least {specials + 2}).")


def plan_single(corpus: TokenizedCorpus, seq_len: int, packing: str = "full_sentences", seed: int = 0) -> SinglePlan:
    """Packs consecutive whole sentences into examples of at most ``seq_len`` tokens.

    Greedy, in corpus order: a sentence joins the current example if it fits in
    ``seq_len - 2`` tokens (counting one [SEP] per document boundary crossed with
    ``packing="full_sentences"``), else the example is closed and the sentence starts the
    next one. With ``"doc_sentences"`` an example is also closed at each document end. A
    sentence longer than ``seq_len - 2`` is cut into chunks of ``seq_len - 2`` tokens; its
    last chunk starts a new example that following sentences may join.

    Args:
      corpus: the tokenized corpus.
      seq_len: example length L, [CLS] and [SEP] included.
      packing: "full_sentences" (may cross documents) or "doc_sentences" (never does).
      seed: unused (packing is deterministic); accepted so every planner takes one.

    Returns:
      A :class:`SinglePlan`.
    """
    del seed
    if packing not in PACKINGS:
        raise ValueError(f"Unknown packing {packing!r}; valid: {', '.join(PACKINGS)}.")
    _check_seq_len(seq_len, 2)
    budget = seq_len - 2
    cross_docs = packing == "full_sentences"
    offsets = corpus.sent_offsets.tolist()
    is_doc_start = np.zeros(corpus.num_sentences + 1, dtype=bool)
    is_doc_start[corpus.doc_offsets[:-1]] = True
    doc_start = is_doc_start.tolist()
    spans: list[tuple[int, int]] = []
    split = 0
    cur_start = cur_end = -1  # Token span of the open example; cur_start < 0: none.
    cur_tokens = 0  # Its size, inner [SEP]s included.
    for s in range(corpus.num_sentences):
        a, b = offsets[s], offsets[s + 1]
        n = b - a
        if cur_start >= 0:
            if doc_start[s] and not cross_docs:
                spans.append((cur_start, cur_end))
                cur_start = -1
            else:
                extra = n + (1 if doc_start[s] else 0)
                if cur_tokens + extra <= budget:
                    cur_end, cur_tokens = b, cur_tokens + extra
                    continue
                spans.append((cur_start, cur_end))
                cur_start = -1
        if n > budget:
            split += 1
            while b - a > budget:
                spans.append((a, a + budget))
                a += budget
        cur_start, cur_end, cur_tokens = a, b, b - a
    if cur_start >= 0:
        spans.append((cur_start, cur_end))
    return SinglePlan(
        spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        seq_len=seq_len,
        packing=packing,
        split_sentences=split,
    )


def _truncate_pair(
    a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator
) -> None:
    """Shrinks spans ``a`` and ``b`` (``[start, end]``, in place) until they fit.

    As BERT's ``truncate_seq_pair``: one token at a time from the longer segment (B on a
    tie), from its front or its back with equal chance. Which segment loses each token
    depends only on the lengths, so the counts are computed first and the front/back
    choices drawn as binomials: the same distribution, fewer draws.
    """
    la, lb = a[1] - a[0], b[1] - b[0]
    excess = la + lb - max_tokens
    if excess <= 0:
        return
    ka = kb = 0
    for _ in range(excess):
        if la > lb:
            la -= 1
            ka += 1
        else:
            lb -= 1
            kb += 1
    for span, k in ((a, ka), (b, kb)):
        if k:
            front = int(rng.binomial(k, 0.5))
            span[0] += front
            span[1] -= k - front


def _split_sentence(
    start: int, end: int, word_start: np.ndarray, rng: np.random.Generator
) -> int | None:
    """A cut point inside the sentence ``[start, end)``: a random word start after its
    first token, any token boundary if it is one word, None if it is one token."""
    if end - start < 2:
        return None
    cuts = np.flatnonzero(word_start[start + 1 : end]) + start + 1
    if len(cuts):
        return int(cuts[rng.integers(0, len(cuts))])
    return start + int(rng.integers(1, end - start))


def _plan_pairs_once(
    corpus: TokenizedCorpus, seq_len: int, kind: ExampleKind, short_seq_prob: float,
    rng: np.random.Generator
) -> PairPlan:
    """One pass of :func:`plan_pairs` over the corpus."""
    max_tokens = seq_len - 3
    offsets = corpus.sent_offsets.tolist()
    doc_offsets = corpus.doc_offsets.tolist()
    num_docs = corpus.num_documents
    word_start = corpus.word_start
    nsp = kind.negative == "random_document"  # else "swap"
    a_spans: list[list[int]] = []
    b_spans: list[list[int]] = []
    labels: list[int] = []
    targets: list[int] = []
    forced = split = dropped = 0

    def draw_target() -> int:
        if short_seq_prob > 0 and rng.random() < short_seq_prob:
            return int(rng.integers(2, max_tokens + 1))
        return max_tokens

    def random_b(d: int, target_b: int) -> list[int]:
        """Sentences of a random other document, from a random one on, up to target_b."""
        r = int(rng.integers(0, num_docs - 1))
        r += r >= d
        j = int(rng.integers(doc_offsets[r], doc_offsets[r + 1]))
        b = [offsets[j], offsets[j + 1]]
        j += 1
        while b[1] - b[0] < target_b and j < doc_offsets[r + 1]:
            b[1] = offsets[j + 1]
            j += 1
        return b

    for d in range(num_docs):
        s0, s1 = doc_offsets[d], doc_offsets[d + 1]
        target = draw_target()
        chunk_start = s0  # The chunk is sentences [chunk_start, i].
        length = 0
        i = s0
        while i < s1:
            length += offsets[i + 1] - offsets[i]
            if i == s1 - 1 or length >= target:
                n_chunk = i + 1 - chunk_start
                # A: the chunk's first a_end sentences; B: the rest (or, for a one-sentence
                # chunk, the sentence is cut in two).
                if n_chunk > 1:
                    a_end = int(rng.integers(1, n_chunk))
                    cut: int | None = offsets[chunk_start + a_end]
                else:
                    a_end = 1
                    cut = _split_sentence(offsets[i], offsets[i + 1], word_start, rng)
                chunk = (offsets[chunk_start], offsets[i + 1])
                label = int(rng.random() < 0.5)
                pair: tuple[list[int], list[int]] | None
                if nsp:
                    if cut is None:  # A one-token chunk has no continuation to show.
                        forced += 1 - label
                        label = 1
                    if label:
                        a = [chunk[0], offsets[chunk_start + a_end]]
                        pair = (a, random_b(d, target - (a[1] - a[0])))
                        i -= n_chunk - a_end  # Put the unused sentences back.
                    else:
                        pair = ([chunk[0], cut], [cut, chunk[1]])
                elif cut is None:
                    pair = None
                    dropped += 1
                else:
                    a, b = [chunk[0], cut], [cut, chunk[1]]
                    pair = (b, a) if label else (a, b)
                if pair is not None:
                    split += n_chunk == 1 and not (nsp and label)
                    _truncate_pair(pair[0], pair[1], max_tokens, rng)
                    a_spans.append(pair[0])
                    b_spans.append(pair[1])
                    labels.append(label)
                    targets.append(target)
                chunk_start = i + 1
                length = 0
                target = draw_target()
            i += 1
    return PairPlan(
        a_spans=np.asarray(a_spans, dtype=np.int64).reshape(-1, 2),
        b_spans=np.asarray(b_spans, dtype=np.int64).reshape(-1, 2),
        labels=np.asarray(labels, dtype=np.int32),
        target_lengths=np.asarray(targets, dtype=np.int32),
        kind=kind.name,
        seq_len=seq_len,
        forced_random=forced,
        split_sentences=split,
        dropped_chunks=dropped,
    )


def plan_pairs(
    corpus: TokenizedCorpus,
    seq_len: int,
    kind: ExampleKind,
    short_seq_prob: float = 0.1,
    seed: int = 0,
    dupe_factor: int = 1,
) -> PairPlan:
    """Plans segment-pair examples for NSP or SOP, as BERT/ALBERT generate them.

    For each document, sentences are accumulated into a chunk until it reaches the target
    length (``seq_len - 3``, or ``randint(2, seq_len - 3)`` with probability
    ``short_seq_prob``) or the document ends. The chunk is split at a random sentence
    boundary into A and B (``a_end`` uniform in ``[1, n - 1]``), then:

    - NSP: half of the time (always when the chunk has one sentence, as in BERT), B is
      replaced by sentences of a random *other* document, from a random sentence on, up
      to the remaining target length; the chunk's unused sentences are put back (the next
      chunk starts right after A). Label 1 = random B.
    - SOP: A and B are always consecutive; half of the time they are swapped. Label 1 =
      swapped.

    The pair is then truncated to ``seq_len - 3`` tokens, one token at a time from the
    longer segment, front or back with equal chance.

    Departures from the reference code, on purpose:

    - The target length is drawn for every chunk (BERT draws it once per document), so
      that about ``short_seq_prob`` of the examples are short whatever the documents'
      lengths.
    - The random document is drawn among the other documents (BERT tries 10 times and
      may still pick the same one).
    - A one-sentence chunk (most often the last sentence of a document) is cut in two at
      a random word start inside the sentence (any token boundary if it is one word),
      giving A and a true-continuation B. BERT and ALBERT instead always give such a
      chunk a random-document B, which makes label 1 more frequent than 50% (about 55%
      on documents of short sentences, 53.5% on the bundled corpus) and, for SOP, mixes
      NSP negatives into the "swapped" class. Here NSP labels are a fair coin and SOP
      pairs are always consecutive text. A one-token sentence alone in a chunk cannot be
      cut: NSP gives it a random B (``forced_random``), SOP drops it
      (``dropped_chunks``).

    Args:
      corpus: the tokenized corpus; its documents must be real documents.
      seq_len: example length L (3 specials included).
      kind: the pair kind an objective declares (``segments=2``); its ``negative`` says
        how label 1 is made ("random_document": NSP, "swap": SOP).
      short_seq_prob: probability of a shorter target length.
      seed: seed of the numpy generator; the plan is a pure function of the arguments.
      dupe_factor: number of passes over the corpus, each with its own seed (BERT's
        static duplication with different random choices).

    Returns:
      A :class:`PairPlan`.

    Raises:
      ValueError: not a pair kind, seq_len too short, or random-document negatives (NSP)
        with fewer than 2 documents.
    """
    if kind.segments != 2 or kind.negative not in NEGATIVES:
        raise ValueError(f"{kind.name!r} is not a pair kind (segments=2, negative one of "
                         f"{', '.join(NEGATIVES)}): {kind}.")
    _check_seq_len(seq_len, 3)
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob must be in [0, 1], got {short_seq_prob}.")
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor must be >= 1, got {dupe_factor}.")
    if kind.negative == "random_document" and corpus.num_documents < 2:
        raise ValueError(
            f"{kind.name.upper()} needs at least 2 documents to draw random next segments; the corpus has "
            f"{corpus.num_documents}."
        )
    plans = [
        _plan_pairs_once(corpus, seq_len, kind, short_seq_prob, np.random.default_rng([seed, k]))
        for k in range(dupe_factor)
    ]
    if len(plans) == 1:
        return plans[0]
    return PairPlan(
        a_spans=np.concatenate([p.a_spans for p in plans]),
        b_spans=np.concatenate([p.b_spans for p in plans]),
        labels=np.concatenate([p.labels for p in plans]),
        target_lengths=np.concatenate([p.target_lengths for p in plans]),
        kind=kind.name,
        seq_len=seq_len,
        forced_random=sum(p.forced_random for p in plans),
        split_sentences=sum(p.split_sentences for p in plans),
        dropped_chunks=sum(p.dropped_chunks for p in plans),
    )


def truncate_parts(parts: list[list[int]], max_tokens: int, rng: np.random.Generator) -> None:
    """Shrinks spans (``[start, end, ...]`` lists, in place) until they fit in
    ``max_tokens``: one token at a time from the longest (the last of equals), from its
    front or its back with equal chance (BERT's ``truncate_seq_pair`` for any number)."""
    lengths = [p[1] - p[0] for p in parts]
    cut = [0] * len(parts)
    for _ in range(max(0, sum(lengths) - max_tokens)):
        i = max(range(len(parts)), key=lambda j: (lengths[j], j))
        lengths[i] -= 1
        cut[i] += 1
    for p, k in zip(parts, cut):
        if k:
            front = int(rng.binomial(k, 0.5))
            p[0] += front
            p[1] -= k - front


def document_chunks(corpus: TokenizedCorpus, target: int, rng: np.random.Generator,
                    short_seq_prob: float):
    """BERT's chunking: (document, first sentence, end sentence) runs of whole sentences
    of one document, each grown until it reaches its target length (``target``, or
    ``randint(2, target)`` with probability ``short_seq_prob``) or the document ends."""
    offsets = corpus.sent_offsets
    doc_offsets = corpus.doc_offsets.tolist()

    def draw() -> int:
        if short_seq_prob > 0 and rng.random() < short_seq_prob:
            return int(rng.integers(2, target + 1))
        return target

    for d in range(corpus.num_documents):
        s0, s1 = doc_offsets[d], doc_offsets[d + 1]
        start, length, goal = s0, 0, draw()
        for i in range(s0, s1):
            length += int(offsets[i + 1] - offsets[i])
            if i == s1 - 1 or length >= goal:
                yield d, start, i + 1
                start, length, goal = i + 1, 0, draw()


def plan_segments(
    corpus: TokenizedCorpus,
    seq_len: int,
    kind: ExampleKind,
    short_seq_prob: float = 0.1,
    seed: int = 0,
    dupe_factor: int = 1,
) -> SegmentsPlan:
    """Plans examples with the kind's own planner (``kind.planner``), one pass per
    ``dupe_factor`` with its own seed, and checks that every example fits.

    Raises:
      ValueError: no planner, an example with more segments than the kind declares or
        that does not fit in ``seq_len``, or a span outside the corpus.
    """
    if kind.planner is None:
        raise ValueError(f"{kind.name!r} has no planner.")
    _check_seq_len(seq_len, kind.segments + 1)
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor must be >= 1, got {dupe_factor}.")
    spans, segments, offsets, labels = [], [], [0], []
    for k in range(dupe_factor):
        rng = np.random.default_rng([seed, k])
        for parts, label in kind.planner(corpus, seq_len, rng, short_seq_prob):
            n = 1 + sum(e - s + 1 for s, e, _ in parts)
            if not 1 <= len(parts) <= kind.segments or n > seq_len:
                raise ValueError(f"{kind.name!r} planner: an example of {len(parts)} "
                                 f"segments and {n} tokens (at most {kind.segments} "
                                 f"segments, {seq_len} tokens).")
            for s, e, g in parts:
                if not 0 <= s < e <= corpus.num_tokens:
                    raise ValueError(f"{kind.name!r} planner: span {(s, e)} outside the corpus.")
                spans.append((s, e))
                segments.append(g)
            offsets.append(len(spans))
            labels.append(label)
    return SegmentsPlan(
        spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        segments=np.asarray(segments, dtype=np.int32),
        offsets=np.asarray(offsets, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int32),
        kind=kind.name,
        seq_len=seq_len,
    )


def _doc_boundaries_inside(corpus_doc_tokens: np.ndarray, start: int, end: int) -> np.ndarray:
    """Document token offsets b with start < b < end."""
    lo = np.searchsorted(corpus_doc_tokens, start, side="right")
    hi = np.searchsorted(corpus_doc_tokens, end, side="left")
    return corpus_doc_tokens[lo:hi]


def _assemble(
    parts: Sequence[tuple[np.ndarray, np.ndarray, int]],
    seq_len: int,
    tokenizer: SpecialIds,
    starts_at: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """``[CLS] part0 [SEP] part1 [SEP] ... [PAD]...`` from (ids, word_start, segment) parts;
    ``starts_at``: each part's corpus token offset, recorded under the private key
    ``_offsets`` (int64 [L], -1 for specials and padding) for the features."""
    n = 1 + sum(len(p[0]) + 1 for p in parts)
    if n > seq_len:
        raise AssertionError(f"Example of {n} tokens exceeds seq_len={seq_len}.")
    input_ids = np.full([seq_len], tokenizer.pad_id, dtype=np.int32)
    segment_ids = np.zeros([seq_len], dtype=np.int32)
    word_ids = np.full([seq_len], -1, dtype=np.int32)
    offsets = np.full([seq_len], -1, dtype=np.int64)
    input_ids[0] = tokenizer.cls_id
    pos = 1
    words = 0
    for j, (ids, word_start, segment) in enumerate(parts):
        k = len(ids)
        input_ids[pos : pos + k] = ids
        if starts_at is not None:
            offsets[pos : pos + k] = starts_at[j] + np.arange(k)
        starts = word_start.astype(np.int32)
        starts[0] = 1  # A part always starts a word.
        word_ids[pos : pos + k] = words + np.cumsum(starts) - 1
        words += int(starts.sum())
        input_ids[pos + k] = tokenizer.sep_id
        segment_ids[pos : pos + k + 1] = segment
        pos += k + 1
    attention_mask = np.zeros([seq_len], dtype=np.int32)
    attention_mask[:pos] = 1
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "attention_mask": attention_mask,
        "word_ids": word_ids,
        "_offsets": offsets,
    }


def make_example(
    corpus: TokenizedCorpus,
    plan: Plan,
    index: int,
    tokenizer: SpecialIds,
    *,
    doc_token_offsets: np.ndarray | None = None,
    features: Sequence[tuple[str, object]] = (),
) -> dict[str, np.ndarray]:
    """Example ``index`` of ``plan`` (see the module docstring for the fields).

    Args:
      corpus: the corpus the plan was made from.
      plan: a :class:`SinglePlan` or :class:`PairPlan`.
      index: in ``[0, len(plan))``.
      tokenizer: gives the [CLS], [SEP] and [PAD] ids.
      doc_token_offsets: ``corpus.doc_token_offsets``, precomputed (optional).
      features: (field, make) pairs of prepared ``Feature``s: ``make(example, offsets)``.
    """
    index = int(index)
    if not 0 <= index < len(plan):
        raise IndexError(f"Example {index} out of range [0, {len(plan)}).")
    if isinstance(plan, SinglePlan):
        start, end = (int(x) for x in plan.spans[index])
        if doc_token_offsets is None:
            doc_token_offsets = corpus.doc_token_offsets
        cuts = [start, *_doc_boundaries_inside(doc_token_offsets, start, end).tolist(), end]
        parts = [
            (corpus.ids[a:b], corpus.word_start[a:b], 0) for a, b in zip(cuts[:-1], cuts[1:])
        ]
        example = _assemble(parts, plan.seq_len, tokenizer, cuts[:-1])
    elif isinstance(plan, SegmentsPlan):
        lo, hi = int(plan.offsets[index]), int(plan.offsets[index + 1])
        spans = plan.spans[lo:hi].tolist()
        example = _assemble(
            [(corpus.ids[a:b], corpus.word_start[a:b], int(g))
             for (a, b), g in zip(spans, plan.segments[lo:hi])],
            plan.seq_len, tokenizer, [a for a, _ in spans])
        example["sentence_label"] = np.asarray(plan.labels[index], dtype=np.int32)
    else:
        (a0, a1), (b0, b1) = plan.a_spans[index], plan.b_spans[index]
        example = _assemble(
            [
                (corpus.ids[a0:a1], corpus.word_start[a0:a1], 0),
                (corpus.ids[b0:b1], corpus.word_start[b0:b1], 1),
            ],
            plan.seq_len,
            tokenizer,
            [a0, b0],
        )
        example["sentence_label"] = np.asarray(plan.labels[index], dtype=np.int32)
    example["example_id"] = np.asarray(index, dtype=np.int32)
    offsets = example.pop("_offsets")
    for name, make in features:
        example[name] = np.asarray(make(example, offsets), dtype=np.int32)
    return example


class Examples(Sequence):
    """The examples of a plan as a random-access sequence (a grain data source).

    Attributes:
      corpus: the tokenized corpus.
      plan: the plan.
      stats: counts for logs (documents, sentences, tokens, examples, ...).
    """

    def __init__(self, corpus: TokenizedCorpus, plan: Plan, tokenizer: SpecialIds, stats: dict[str, int | str] | None = None,
                 features: Sequence[object] = (),
                 train_corpus: Callable[[], TokenizedCorpus] | None = None):
        self.corpus = corpus
        self.plan = plan
        context = FeatureContext(corpus, tokenizer, train_corpus)
        self._features = tuple((f.name, f.prepare(context)) for f in features)
        self._specials = _Specials(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
        self._doc_token_offsets = corpus.doc_token_offsets
        self.stats = dict(stats or {})

    @property
    def kind(self) -> str:
        return self.plan.kind

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        return make_example(
            self.corpus, self.plan, index, self._specials, doc_token_offsets=self._doc_token_offsets,
            features=self._features,
        )

    def __repr__(self) -> str:
        return f"Examples(kind={self.kind!r}, n={len(self)}, seq_len={self.plan.seq_len})"


@dataclasses.dataclass(frozen=True)
class _Specials:
    """The special ids :func:`make_example` uses (picklable stand-in for a tokenizer)."""

    cls_id: int
    sep_id: int
    pad_id: int
