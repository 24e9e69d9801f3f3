"""Tests of the host-side data pipeline: tokenizer, sources, corpus cache, single
examples and the grain iterators."""

from __future__ import annotations

import gzip
import os
import pathlib

import ml_collections
import numpy as np
import pytest

from bert_jax.data import bundled
from bert_jax.data import corpus as corpus_lib
from bert_jax.data import examples as examples_lib
from bert_jax.data import pipeline
from bert_jax.data import sources
from bert_jax.data import tokenizer as tokenizer_lib
import objectives

SEQ_LEN = 32


def make_data_cfg(**overrides) -> ml_collections.ConfigDict:
    """A data config with every field the pipeline reads."""
    fields = dict(
        source="bundled", train_files="", eval_files="", text_format="sentences",
        tfds_name="", tfds_data_dir="", tfds_text_key="text", train_split="train",
        eval_split="validation", seq_len=SEQ_LEN, packing="full_sentences",
        short_seq_prob=0.1, dupe_factor=1, tokenizer="", vocab_size=400,
        tokenizer_type="unigram", num_threads=0, cache_dir="",
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


@pytest.fixture(scope="module")
def kjv_docs() -> list[list[str]]:
    docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
    return docs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, kjv_docs) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tok")
    tokenizer_lib.train_tokenizer((s for d in kjv_docs for s in d), out, vocab_size=400)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load_tokenizer(tok_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, kjv_docs) -> pathlib.Path:
    """Train/eval text files in the "sentences" format, one gzipped, plus a file with a
    non-UTF-8 line."""
    root = tmp_path_factory.mktemp("text")
    train_docs = kjv_docs[:24]
    half = len(train_docs) // 2

    def render(docs):
        return "\n\n".join("\n".join(d) for d in docs) + "\n"

    (root / "train_a.txt").write_text(render(train_docs[:half]), encoding="utf-8")
    with gzip.open(root / "train_b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(render(train_docs[half:]))
    (root / "eval.txt").write_text(render(kjv_docs[24:]), encoding="utf-8")
    (root / "bad.txt").write_bytes(
        b"A good first line.\nA bad \xff\xfe line.\nAnother good line.\n\nSecond doc.\n"
    )
    return root


# ------------------------------------------------------------------------- tokenizer


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.first_regular_id == 5
    assert 100 < tok.vocab_size <= 400
    ids = tok.encode("And God said, Let there be light: and there was light.")
    assert ids and min(ids) >= tok.first_regular_id
    assert "light" in tok.decode(ids)


def test_word_starts(tok):
    import sentencepiece as spm

    text = "In the beginning God created the heaven and the earth."
    ids = tok.encode(text)
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    pieces = [sp.id_to_piece(i) for i in ids]
    starts = tok.word_starts(ids)
    assert starts.dtype == bool and starts.shape == (len(ids),)
    np.testing.assert_array_equal(starts, [p.startswith("\u2581") for p in pieces])
    assert starts.sum() == len(text.split())


def test_train_tokenizer_deterministic_and_empty(tmp_path, kjv_docs):
    sents = [s for d in kjv_docs[:10] for s in d]
    a = tokenizer_lib.train_tokenizer(sents, tmp_path / "a", vocab_size=150)
    b = tokenizer_lib.train_tokenizer(sents, tmp_path / "b", vocab_size=150)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "tokenizer.vocab").is_file()
    with pytest.raises(ValueError, match="no non-empty sentences"):
        tokenizer_lib.train_tokenizer(["", "  "], tmp_path / "c")


def test_ensure_tokenizer(tmp_path, text_corpus, tok_dir):
    cfg = make_data_cfg(source="text", train_files=str(text_corpus / "train_*"), vocab_size=200)
    work = tmp_path / "run"
    first = tokenizer_lib.ensure_tokenizer(cfg, work)  # Trains.
    model = work / "tokenizer.model"
    assert model.is_file() and first.cls_id == 2
    mtime = model.stat().st_mtime_ns
    again = tokenizer_lib.ensure_tokenizer(cfg, work)  # Loads the workdir's.
    assert again.fingerprint == first.fingerprint and model.stat().st_mtime_ns == mtime
    # A configured tokenizer is copied into a fresh workdir...
    cfg2 = make_data_cfg(tokenizer=str(tok_dir / "tokenizer.model"))
    got = tokenizer_lib.ensure_tokenizer(cfg2, tmp_path / "run2")
    assert (tmp_path / "run2" / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    assert got.vocab_size == tokenizer_lib.load_tokenizer(tok_dir).vocab_size
    # ... and must not silently replace a different one.
    with pytest.raises(ValueError, match="differs"):
        tokenizer_lib.ensure_tokenizer(cfg2, work)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="No tokenizer"):
        tokenizer_lib.load_tokenizer(tmp_path / "missing.model")


# --------------------------------------------------------------------------- sources


def test_bundled_source():
    docs = sources.load_documents(make_data_cfg(), "eval")
    assert docs.stats.documents == len(docs.documents) > 10
    assert docs.has_document_boundaries
    assert docs.stats.sentences == sum(len(d) for d in docs.documents)


def test_text_source_globs_and_formats(text_corpus, kjv_docs):
    cfg = make_data_cfg(
        source="text",
        train_files=f"{text_corpus}/train_a.txt, {text_corpus}/train_b.*",
        eval_files=str(text_corpus / "eval.txt"),
    )
    train = sources.load_documents(cfg, "train")
    assert train.documents == kjv_docs[:24]  # Both files, in glob order, gz included.
    assert train.stats.has_document_boundaries
    assert sources.load_documents(cfg, "eval").documents == kjv_docs[24:]

    cfg.text_format = "plain"
    plain = sources.load_documents(cfg, "train")
    assert not plain.has_document_boundaries
    assert len(plain.documents) == 2  # One document per file.
    assert sum(len(d) for d in plain.documents) == sum(len(d) for d in kjv_docs[:24])

    cfg.text_format = "lines"
    lines = sources.load_documents(cfg, "train")
    n_lines = sum(len(d) for d in kjv_docs[:24])
    assert len(lines.documents) == n_lines  # Each line a document...
    assert lines.stats.sentences >= n_lines  # ... split into sentences.
    assert sources.split_sentences('He said "Go." Then? Yes! ok') == ['He said "Go."', "Then?", "Yes!", "ok"]


def test_text_source_non_utf8_and_errors(text_corpus, tmp_path):
    cfg = make_data_cfg(source="text", train_files=str(text_corpus / "bad.txt"))
    docs = sources.load_documents(cfg, "train")
    assert docs.skipped_non_utf8 == docs.stats.skipped_non_utf8 == 1
    assert docs.documents == [["A good first line.", "Another good line."], ["Second doc."]]

    missing = make_data_cfg(source="text", train_files=str(tmp_path / "nope*.txt"))
    with pytest.raises(ValueError, match="nope"):
        sources.load_documents(missing, "train")
    (tmp_path / "empty.txt").write_text("\n\n\n")
    empty = make_data_cfg(source="text", train_files=str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="No text"):
        sources.load_documents(empty, "train")
    with pytest.raises(ValueError, match="eval_files"):
        sources.load_documents(make_data_cfg(source="text", train_files="x"), "eval")
    with pytest.raises(ValueError, match="Unknown data.source"):
        sources.load_documents(make_data_cfg(source="nope"), "train")


def test_tfds_source_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    cfg = make_data_cfg(source="tfds", tfds_name="lm1b", train_split="train", eval_split="test")
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=7):
        docs = sources.load_documents(cfg, "train")
        assert docs.stats.documents == 7 and docs.has_document_boundaries
        assert all(isinstance(s, str) and s for d in docs.documents for s in d)
        bad_key = make_data_cfg(source="tfds", tfds_name="lm1b", tfds_text_key="body")
        with pytest.raises(ValueError, match="'body'.*text"):
            sources.load_documents(bad_key, "train")
    with pytest.raises(ValueError, match="Unknown tfds dataset 'lm1bb'"):
        sources.load_documents(make_data_cfg(source="tfds", tfds_name="lm1bb"), "train")
    unprepared = make_data_cfg(source="tfds", tfds_name="lm1b", tfds_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="tfds build lm1b --file_format=array_record"):
        sources.load_documents(unprepared, "train")


# ---------------------------------------------------------------------------- corpus


def test_tokenize_documents(tok):
    docs = [["In the beginning.", "", "And God said."], ["   "], ["Amen."]]
    c = corpus_lib.tokenize_documents(docs, tok)
    assert c.num_documents == 2 and c.num_sentences == 3
    assert c.ids.dtype == np.int32 and c.word_start.dtype == bool
    np.testing.assert_array_equal(c.doc_offsets, [0, 2, 3])
    np.testing.assert_array_equal(
        c.ids[c.sent_offsets[1] : c.sent_offsets[2]], tok.encode("And God said.")
    )
    assert c.word_start[c.sent_offsets[:-1]].all()


def test_corpus_cache_reused(tmp_path, tok, text_corpus, monkeypatch):
    cfg = make_data_cfg(source="text", train_files=str(text_corpus / "train_*"))
    calls = []
    real = corpus_lib.tokenize_documents
    monkeypatch.setattr(
        corpus_lib, "tokenize_documents", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    c1, s1 = corpus_lib.load_corpus(cfg, "train", tok, tmp_path)
    c2, s2 = corpus_lib.load_corpus(cfg, "train", tok, tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(c1.ids, c2.ids)
    np.testing.assert_array_equal(c1.doc_offsets, c2.doc_offsets)
    assert s1 == s2
    cfg.text_format = "plain"  # Another source config: another cache entry.
    corpus_lib.load_corpus(cfg, "train", tok, tmp_path)
    assert len(calls) == 2 and len(list(tmp_path.glob("corpus-train-*.npz"))) == 2


# ------------------------------------------------------------------ single examples


def synthetic_corpus(doc_sentence_lengths: list[list[int]], seed: int = 0) -> corpus_lib.TokenizedCorpus:
    """A corpus whose token ids are 5 + the global token index (so every token is
    traceable); about one token in three starts a word."""
    lengths = [n for d in doc_sentence_lengths for n in d]
    total = sum(lengths)
    ids = (np.arange(total) + 5).astype(np.int32)
    word_start = np.random.default_rng(seed).random(total) < 0.35
    sent_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    word_start[sent_offsets[:-1]] = True
    doc_offsets = np.concatenate([[0], np.cumsum([len(d) for d in doc_sentence_lengths])]).astype(np.int64)
    return corpus_lib.TokenizedCorpus(ids, word_start, sent_offsets, doc_offsets)


class Specials:
    cls_id, sep_id, pad_id = 2, 3, 0


def check_format(ex: dict[str, np.ndarray], corpus: corpus_lib.TokenizedCorpus, seq_len: int) -> None:
    """Invariants shared by all examples."""
    ids, seg, mask, words = ex["input_ids"], ex["segment_ids"], ex["attention_mask"], ex["word_ids"]
    for v in (ids, seg, mask, words):
        assert v.shape == (seq_len,) and v.dtype == np.int32
    assert ex["example_id"].shape == () and ex["example_id"].dtype == np.int32
    n = int(mask.sum())
    np.testing.assert_array_equal(mask, np.arange(seq_len) < n)  # A prefix of ones.
    assert ids[0] == Specials.cls_id and ids[n - 1] == Specials.sep_id
    assert (ids[n:] == Specials.pad_id).all() and (seg[n:] == 0).all()
    special = np.isin(ids, [Specials.cls_id, Specials.sep_id]) | (mask == 0)
    np.testing.assert_array_equal(words == -1, special)
    real = words[~special]
    assert real[0] == 0 and set(np.diff(real).tolist()) <= {0, 1}
    # A new word exactly where the corpus says one starts, and where a part begins.
    toks = ids[~special] - 5
    new_word = np.diff(np.concatenate([[-1], real])) == 1
    part_start = np.concatenate([[True], special[:-1]])[~special]
    np.testing.assert_array_equal(new_word, corpus.word_start[toks] | part_start)


def test_plan_single_full_sentences():
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 12, size=rng.integers(1, 8)).tolist() for _ in range(60)]
    docs[3][0] = 75  # Longer than L - 2 = 30: split into 30 + 30 + 15.
    corpus = synthetic_corpus(docs)
    plan = examples_lib.plan_single(corpus, SEQ_LEN, "full_sentences", seed=0)
    assert plan.split_sentences == 1
    doc_tok = corpus.doc_token_offsets
    seen = []
    crossed = 0
    for i in range(len(plan)):
        ex = examples_lib.make_example(corpus, plan, i, Specials)
        check_format(ex, corpus, SEQ_LEN)
        assert ex["example_id"] == i and (ex["segment_ids"] == 0).all()
        start, end = plan.spans[i]
        inner = doc_tok[(doc_tok > start) & (doc_tok < end)]
        crossed += len(inner)
        n = int(ex["attention_mask"].sum())
        assert (ex["input_ids"][:n] == Specials.sep_id).sum() == 1 + len(inner)
        body = ex["input_ids"][1 : n - 1]
        seen.append(body[body != Specials.sep_id])
        # Whole sentences unless a long sentence was cut.
        assert start in corpus.sent_offsets or end - start <= SEQ_LEN - 2
    assert crossed > 0
    np.testing.assert_array_equal(np.concatenate(seen), corpus.ids)  # Every token once, in order.
    # Packing is greedy: the next sentence would not have fit.
    fill = (plan.spans[:, 1] - plan.spans[:, 0]).mean()
    assert fill > 0.7 * (SEQ_LEN - 2)


def test_plan_single_doc_sentences():
    rng = np.random.default_rng(2)
    docs = [rng.integers(1, 12, size=rng.integers(1, 8)).tolist() for _ in range(40)]
    corpus = synthetic_corpus(docs)
    plan = examples_lib.plan_single(corpus, SEQ_LEN, "doc_sentences")
    doc_tok = corpus.doc_token_offsets
    for i in range(len(plan)):
        start, end = plan.spans[i]
        d = np.searchsorted(doc_tok, start, side="right") - 1
        assert end <= doc_tok[d + 1]  # Never crosses a document.
        ex = examples_lib.make_example(corpus, plan, i, Specials)
        check_format(ex, corpus, SEQ_LEN)
        assert (ex["input_ids"] == Specials.sep_id).sum() == 1
    assert plan.spans[0, 0] == 0 and plan.spans[-1, 1] == corpus.num_tokens
    with pytest.raises(ValueError, match="packing"):
        examples_lib.plan_single(corpus, SEQ_LEN, "nope")


def test_real_tokenizer_word_ids(tok, kjv_docs):
    corpus = corpus_lib.tokenize_documents(kjv_docs[:5], tok)
    plan = examples_lib.plan_single(corpus, 64, "full_sentences")
    ex = examples_lib.make_example(corpus, plan, 0, tok)
    n = int(ex["attention_mask"].sum())
    words = ex["word_ids"][1 : n - 1]
    text_words = tok.decode(ex["input_ids"][1 : n - 1]).split()
    # Word ids count the text's words (the example holds whole sentences).
    assert words.max() + 1 == len(text_words)


# ------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def train_ds(tmp_path_factory, tok, text_corpus):
    cfg = make_data_cfg(source="text", train_files=str(text_corpus / "train_*"))
    return pipeline.build_dataset(
        cfg, tok, "train", seed=0, workdir=tmp_path_factory.mktemp("work")
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def test_build_dataset(train_ds, tok):
    assert len(train_ds) > 40
    ex = train_ds[3]
    assert ex["input_ids"].shape == (SEQ_LEN,) and int(ex["example_id"]) == 3
    assert ex["input_ids"][0] == tok.cls_id


def test_train_iterator_deterministic_and_resumable(train_ds):
    kw = dict(batch_size_per_host=4, process_index=0, process_count=1)
    first = take(pipeline.train_iterator(train_ds, seed=3, **kw), 6)
    again = take(pipeline.train_iterator(train_ds, seed=3, **kw), 6)
    other = take(pipeline.train_iterator(train_ds, seed=4, **kw), 6)
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a["example_id"], b["example_id"]) for a, b in zip(first, other))
    assert first[0]["epoch"].dtype == np.int32 and first[0]["input_ids"].shape == (4, SEQ_LEN)

    it = pipeline.train_iterator(train_ds, seed=3, **kw)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 4)
    resumed = pipeline.train_iterator(train_ds, seed=3, **kw)
    resumed.set_state(state)
    for a, b in zip(expected, take(resumed, 4)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_train_iterator_epochs(train_ds):
    n = len(train_ds)
    bs = 4
    it = pipeline.train_iterator(train_ds, batch_size_per_host=bs, seed=0)
    batches = take(it, (2 * n) // bs + 1)
    ids = np.concatenate([b["example_id"] for b in batches])
    epochs = np.concatenate([b["epoch"] for b in batches])
    np.testing.assert_array_equal(epochs, np.arange(len(ids)) // n)
    assert sorted(ids[:n]) == list(range(n))  # An epoch is a permutation...
    assert sorted(ids[n : 2 * n]) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])  # ... reshuffled each epoch.


def test_host_sharding(train_ds):
    n = len(train_ds)
    bs = 3
    steps = n // (2 * bs) + 2  # Past the end of the first epoch.

    def host_stream(p: int, count: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        it = pipeline.train_iterator(train_ds, batch_size_per_host=batch, seed=5,
                                     process_index=p, process_count=count)
        batches = take(it, steps)
        return (np.concatenate([b["example_id"] for b in batches]),
                np.concatenate([b["epoch"] for b in batches]))

    (ids0, ep0), (ids1, ep1) = host_stream(0, 2, bs), host_stream(1, 2, bs)
    first0, first1 = set(ids0[ep0 == 0].tolist()), set(ids1[ep1 == 0].tolist())
    assert not first0 & first1  # Disjoint...
    assert first0 | first1 == set(range(n))  # ... and together one epoch.
    # A global batch is the same set of examples as with one host and twice the batch.
    single, _ = host_stream(0, 1, 2 * bs)
    for step in range(steps):
        sl = slice(step * bs, (step + 1) * bs)
        together = set(ids0[sl].tolist()) | set(ids1[sl].tolist())
        assert together == set(single[2 * step * bs : 2 * (step + 1) * bs].tolist())


def test_small_corpus_errors(tmp_path, tok, text_corpus, train_ds):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.train_iterator(train_ds, batch_size_per_host=len(train_ds), seed=0,
                                process_index=0, process_count=2)
    cfg = make_data_cfg(source="text", train_files=str(text_corpus / "bad.txt"))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.build_dataset(cfg, tok, "train", seed=0, workdir=tmp_path, global_batch_size=64)
    cfg.text_format = "plain"
    with pytest.raises(ValueError, match="no document boundaries"):
        pipeline.build_dataset(cfg, tok, "train", seed=0,
                               example_kind=objectives.get("sop").example_kind, workdir=tmp_path)


def test_eval_batches(train_ds, caplog):
    batches = pipeline.eval_batches(train_ds, batch_size=4, num_batches=3)
    assert len(batches) == 3
    np.testing.assert_array_equal(
        np.concatenate([b["example_id"] for b in batches]), np.arange(12)
    )
    capped = pipeline.eval_batches(train_ds, batch_size=4, num_batches=10_000)
    assert len(capped) == len(train_ds) // 4
    host1 = pipeline.eval_batches(train_ds, batch_size=2, num_batches=2, process_index=1,
                                  process_count=2)
    np.testing.assert_array_equal(host1[0]["example_id"], [1, 3])
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.eval_batches(train_ds, batch_size=len(train_ds) + 1)


def test_pair_dataset_from_text(tmp_path, tok, text_corpus):
    cfg = make_data_cfg(source="text", train_files=str(text_corpus / "train_*"), seq_len=64)
    ds = pipeline.build_dataset(cfg, tok, "train", seed=0,
                                example_kind=objectives.get("nsp").example_kind, workdir=tmp_path)
    ex = ds[0]
    assert ex["sentence_label"].dtype == np.int32 and ex["input_ids"].shape == (64,)
    assert (ex["input_ids"] == tok.sep_id).sum() == 2
    assert os.path.isdir(tmp_path / "data_cache")
