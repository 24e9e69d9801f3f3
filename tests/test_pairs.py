"""Tests of the NSP/SOP pair builder on a synthetic corpus whose every token names its
position, so each example can be traced back to its documents and sentences."""

from __future__ import annotations

import numpy as np
import pytest

from bert_jax.data import corpus as corpus_lib
from bert_jax.data import examples as examples_lib
from objectives.base import ExampleKind
from objectives.nsp import NextSentencePrediction
from objectives.sop import SentenceOrderPrediction

NSP, SOP = NextSentencePrediction.example_kind, SentenceOrderPrediction.example_kind

SEQ_LEN = 64
MAX_TOKENS = SEQ_LEN - 3


class Specials:
    cls_id, sep_id, pad_id = 2, 3, 0


def make_corpus(num_docs: int, seed: int = 0) -> corpus_lib.TokenizedCorpus:
    """Documents of 4..30 sentences of 3..24 tokens; token id = 5 + global token index."""
    rng = np.random.default_rng(seed)
    doc_sizes = rng.integers(4, 31, size=num_docs)
    lengths = rng.integers(3, 25, size=int(doc_sizes.sum()))
    total = int(lengths.sum())
    ids = (np.arange(total) + 5).astype(np.int32)
    sent_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    word_start = rng.random(total) < 0.4
    word_start[sent_offsets[:-1]] = True
    doc_offsets = np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64)
    return corpus_lib.TokenizedCorpus(ids, word_start, sent_offsets, doc_offsets)


@pytest.fixture(scope="module")
def corpus() -> corpus_lib.TokenizedCorpus:
    return make_corpus(400)


def doc_of_token(corpus: corpus_lib.TokenizedCorpus, token_index: np.ndarray) -> np.ndarray:
    return np.searchsorted(corpus.doc_token_offsets, token_index, side="right") - 1


def segments(ex: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Corpus token indices of segments A and B, read back from the example itself."""
    ids, seg, mask = ex["input_ids"], ex["segment_ids"], ex["attention_mask"]
    n = int(mask.sum())
    assert ids[0] == Specials.cls_id and ids[n - 1] == Specials.sep_id
    seps = np.flatnonzero(ids[:n] == Specials.sep_id)
    assert len(seps) == 2
    a_end = seps[0]
    np.testing.assert_array_equal(seg[: a_end + 1], 0)
    np.testing.assert_array_equal(seg[a_end + 1 : n], 1)
    assert (seg[n:] == 0).all() and (ids[n:] == Specials.pad_id).all()
    np.testing.assert_array_equal(mask, np.arange(len(ids)) < n)
    words = ex["word_ids"]
    special = np.isin(ids, [Specials.cls_id, Specials.sep_id]) | (mask == 0)
    np.testing.assert_array_equal(words == -1, special)
    real = words[~special]
    assert real[0] == 0 and set(np.diff(real).tolist()) <= {0, 1}
    a = ids[1:a_end].astype(np.int64) - 5
    b = ids[a_end + 1 : n - 1].astype(np.int64) - 5
    assert len(a) >= 1 and len(b) >= 1
    # Each segment is a contiguous run of corpus tokens.
    assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()
    return a, b


def all_examples(corpus, plan):
    return [examples_lib.make_example(corpus, plan, i, Specials) for i in range(len(plan))]


@pytest.fixture(scope="module")
def nsp(corpus):
    plan = examples_lib.plan_pairs(corpus, SEQ_LEN, NSP, short_seq_prob=0.1, seed=0)
    return plan, all_examples(corpus, plan)


@pytest.fixture(scope="module")
def sop(corpus):
    plan = examples_lib.plan_pairs(corpus, SEQ_LEN, SOP, short_seq_prob=0.1, seed=0)
    return plan, all_examples(corpus, plan)


def untruncated(a: np.ndarray, b: np.ndarray) -> bool:
    return len(a) + len(b) < MAX_TOKENS


def test_nsp_labels_and_sources(corpus, nsp):
    plan, examples = nsp
    n = len(plan)
    assert n > 2000
    labels = np.array([int(ex["sentence_label"]) for ex in examples])
    np.testing.assert_array_equal(labels, plan.labels)
    assert abs(labels.mean() - 0.5) < 0.02
    assert plan.forced_random == 0  # No one-token sentences here.
    assert 0 < plan.split_sentences < 0.1 * n  # One-sentence chunks were cut in two.
    exact = 0
    for ex, label in zip(examples, labels):
        a, b = segments(ex)
        da, db = doc_of_token(corpus, a), doc_of_token(corpus, b)
        assert (da == da[0]).all() and (db == db[0]).all()  # Each within one document.
        if label == 1:
            assert da[0] != db[0]  # Random B: another document.
        else:
            assert da[0] == db[0] and a[-1] < b[0]  # True continuation, in order.
            if untruncated(a, b):
                exact += 1
                assert b[0] == a[-1] + 1  # Directly consecutive.
                assert a[0] in corpus.sent_offsets and b[-1] + 1 in corpus.sent_offsets
    assert exact > 100


def test_nsp_random_b_starts_at_sentence(corpus, nsp):
    plan, examples = nsp
    starts = set(corpus.sent_offsets.tolist())
    checked = 0
    for ex, label in zip(examples, plan.labels):
        a, b = segments(ex)
        if label == 1 and untruncated(a, b):
            assert b[0] in starts
            checked += 1
    assert checked > 100


def test_nsp_puts_unused_sentences_back(corpus):
    """After a random B the chunk's unused sentences go back: the next example starts
    right after A. After a true B it starts right after B."""
    plan = examples_lib.plan_pairs(corpus, SEQ_LEN, NSP, short_seq_prob=0.0, seed=1)
    starts = set(corpus.sent_offsets.tolist())
    doc_a = doc_of_token(corpus, plan.a_spans[:, 0])
    checked = {0: [], 1: []}
    for i in range(len(plan) - 1):
        label = int(plan.labels[i])
        end = int(plan.a_spans[i, 1] if label else plan.b_spans[i, 1])
        nxt = int(plan.a_spans[i + 1, 0])
        # Only where truncation did not visibly move these ends (it can still remove a
        # whole sentence from the front of the next A, rarely).
        if doc_a[i] == doc_a[i + 1] and end in starts and nxt in starts:
            assert end <= nxt
            checked[label].append(nxt == end)
    for label in (0, 1):
        assert len(checked[label]) > 100 and np.mean(checked[label]) > 0.95


def test_sop_labels_and_order(corpus, sop):
    plan, examples = sop
    n = len(plan)
    labels = np.array([int(ex["sentence_label"]) for ex in examples])
    np.testing.assert_array_equal(labels, plan.labels)
    assert abs(labels.mean() - 0.5) < 0.02
    exact = {0: 0, 1: 0}
    for ex, label in zip(examples, labels):
        a, b = segments(ex)
        da, db = doc_of_token(corpus, a), doc_of_token(corpus, b)
        assert (da == da[0]).all() and (db == db[0]).all() and da[0] == db[0]
        if label == 0:
            assert a[-1] < b[0]
        else:
            assert b[-1] < a[0]  # Swapped: what is shown first comes later in the text.
        if untruncated(a, b):
            exact[int(label)] += 1
            first, second = (a, b) if label == 0 else (b, a)
            assert second[0] == first[-1] + 1  # The two segments are adjacent.
    assert min(exact.values()) > 100
    assert plan.forced_random == 0 and plan.split_sentences < 0.1 * n


def test_sop_negative_is_positive_swapped(corpus, sop):
    """Untruncated, a positive is a chunk of whole sentences cut at a sentence boundary
    into (A, B); a negative is exactly such a chunk shown as (B, A)."""
    plan, examples = sop
    starts = set(corpus.sent_offsets.tolist())
    seen = {0: 0, 1: 0}
    for ex, label in zip(examples, plan.labels):
        a, b = segments(ex)
        if not untruncated(a, b):
            continue
        first, second = (a, b) if label == 0 else (b, a)
        assert first[0] in starts and second[-1] + 1 in starts  # Whole chunk.
        assert second[0] == first[-1] + 1  # Adjacent...
        one_sentence = np.searchsorted(corpus.sent_offsets, first[0], side="right") == \
            np.searchsorted(corpus.sent_offsets, second[-1], side="right")
        if not one_sentence:
            assert second[0] in starts  # ... cut at a sentence boundary.
        seen[int(label)] += 1
    assert min(seen.values()) > 100


def test_lengths_and_short_seq_prob(corpus):
    full = examples_lib.plan_pairs(corpus, SEQ_LEN, NSP, short_seq_prob=0.0, seed=0)
    assert (full.target_lengths == MAX_TOKENS).all()
    short = examples_lib.plan_pairs(corpus, SEQ_LEN, NSP, short_seq_prob=0.3, seed=0)
    frac = (short.target_lengths < MAX_TOKENS).mean()
    assert abs(frac - 0.3 * (1 - 1 / (MAX_TOKENS - 1))) < 0.03
    assert short.target_lengths.min() >= 2
    for plan in (full, short):
        total = (plan.a_spans[:, 1] - plan.a_spans[:, 0]) + (plan.b_spans[:, 1] - plan.b_spans[:, 0])
        assert total.max() <= MAX_TOKENS
        assert (plan.a_spans[:, 1] > plan.a_spans[:, 0]).all()
        assert (plan.b_spans[:, 1] > plan.b_spans[:, 0]).all()
    mean_full = np.mean((full.a_spans[:, 1] - full.a_spans[:, 0]) + (full.b_spans[:, 1] - full.b_spans[:, 0]))
    mean_short = np.mean((short.a_spans[:, 1] - short.a_spans[:, 0]) + (short.b_spans[:, 1] - short.b_spans[:, 0]))
    assert mean_short < mean_full
    assert len(short) > len(full)  # Shorter targets, more examples.


def test_deterministic_and_dupe_factor(corpus):
    a = examples_lib.plan_pairs(corpus, SEQ_LEN, SOP, seed=7)
    b = examples_lib.plan_pairs(corpus, SEQ_LEN, SOP, seed=7)
    c = examples_lib.plan_pairs(corpus, SEQ_LEN, SOP, seed=8)
    np.testing.assert_array_equal(a.a_spans, b.a_spans)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels[:100], c.labels[:100])
    d = examples_lib.plan_pairs(corpus, SEQ_LEN, SOP, seed=7, dupe_factor=2)
    assert len(d) > len(a)
    np.testing.assert_array_equal(d.a_spans[: len(a)], a.a_spans)
    assert not np.array_equal(d.labels[len(a) : 2 * len(a)], a.labels)


def test_truncation_is_front_and_back(corpus):
    # A corpus of long sentences forces truncation; both ends must get cut.
    rng = np.random.default_rng(0)
    lengths = [rng.integers(40, 90, size=rng.integers(3, 6)).tolist() for _ in range(60)]
    flat = [n for d in lengths for n in d]
    total = sum(flat)
    sent_offsets = np.concatenate([[0], np.cumsum(flat)]).astype(np.int64)
    ws = np.zeros(total, bool)
    ws[sent_offsets[:-1]] = True
    doc_offsets = np.concatenate([[0], np.cumsum([len(d) for d in lengths])]).astype(np.int64)
    long = corpus_lib.TokenizedCorpus((np.arange(total) + 5).astype(np.int32), ws, sent_offsets, doc_offsets)
    plan = examples_lib.plan_pairs(long, SEQ_LEN, SOP, short_seq_prob=0.0, seed=0)
    starts = set(sent_offsets.tolist())
    front = sum(int(s) not in starts for s in plan.a_spans[:, 0]) + sum(int(s) not in starts for s in plan.b_spans[:, 0])
    back = sum(int(e) not in starts for e in plan.a_spans[:, 1]) + sum(int(e) not in starts for e in plan.b_spans[:, 1])
    assert front > 20 and back > 20
    for i in range(len(plan)):
        segments(examples_lib.make_example(long, plan, i, Specials))


def test_errors(corpus):
    offsets = corpus.sent_offsets[:6]
    one_doc = corpus_lib.TokenizedCorpus(
        corpus.ids[: offsets[-1]], corpus.word_start[: offsets[-1]], offsets, np.array([0, 5])
    )
    one_doc.validate()
    with pytest.raises(ValueError, match="at least 2 documents"):
        examples_lib.plan_pairs(one_doc, SEQ_LEN, NSP)
    assert len(examples_lib.plan_pairs(one_doc, SEQ_LEN, SOP)) > 0
    with pytest.raises(ValueError, match="pair kind"):
        examples_lib.plan_pairs(corpus, SEQ_LEN, ExampleKind("single"))
    with pytest.raises(ValueError, match="too short"):
        examples_lib.plan_pairs(corpus, 4, SOP)
