"""Tests of the bundled KJV corpus and task, and of read_documents."""

import gzip
import json

import pytest

from bert_jax.data import bundled


@pytest.fixture(scope="module")
def corpus():
    return {split: bundled.read_documents(bundled.corpus_path(split))
            for split in bundled.CORPUS_SPLITS}


def _read_task(split):
    with gzip.open(bundled.task_path(split), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_corpus_files_exist_and_are_large_enough():
    total = 0
    for split in bundled.CORPUS_SPLITS:
        path = bundled.corpus_path(split)
        assert path.is_file(), path
        with gzip.open(path, "rb") as f:
            total += len(f.read())
    assert total >= 3_000_000


def test_corpus_path_names_valid_splits_on_error():
    assert bundled.corpus_path("validation").name == "kjv_valid.txt.gz"
    with pytest.raises(ValueError, match="train, validation"):
        bundled.corpus_path("test")
    with pytest.raises(ValueError, match="train, dev"):
        bundled.task_path("validation")


def test_corpus_reads_cleanly_and_splits_are_disjoint(corpus):
    texts = {}
    for split, (documents, stats) in corpus.items():
        assert stats.skipped_non_utf8 == 0
        assert stats.empty_documents_skipped == 0
        assert documents
        texts[split] = {"\n".join(doc) for doc in documents}
        assert len(texts[split]) == len(documents)  # Every chapter is distinct.
    assert not texts["train"] & texts["validation"]
    # About 3% of the chapters are held out.
    n_train, n_valid = len(texts["train"]), len(texts["validation"])
    assert 0.02 < n_valid / (n_train + n_valid) < 0.05


def test_documents_have_several_sentences(corpus):
    for documents, _ in corpus.values():
        sentences = sum(len(doc) for doc in documents)
        assert sentences / len(documents) > 1
        assert all(sentence.strip() == sentence and sentence for doc in documents
                   for sentence in doc)


def test_task_labels_and_splits():
    names = bundled.task_label_names()
    assert len(names) == 6
    examples = {split: _read_task(split) for split in bundled.TASK_SPLITS}
    for split, rows in examples.items():
        assert {row["label"] for row in rows} == set(range(6)), split
        for row in rows:
            assert names[row["label"]] == row["label_name"]
            assert len(row["text"].split()) >= 5
        counts = [sum(row["label"] == label for row in rows) for label in range(6)]
        assert max(counts) <= (1000 if split == "train" else 100)
    train_texts = {row["text"] for row in examples["train"]}
    assert not any(row["text"] in train_texts for row in examples["dev"])


def test_task_examples_come_from_their_corpus_split(corpus):
    sentences = {split: {s for doc in documents for s in doc}
                 for split, (documents, _) in corpus.items()}
    # A long verse may be cut into several corpus sentences: look for those in documents.
    text = {split: "\n".join(" ".join(doc) for doc in documents)
            for split, (documents, _) in corpus.items()}

    def in_split(example_text, split):
        return example_text in sentences[split] or example_text in text[split]

    for task_split, corpus_split in (("train", "train"), ("dev", "validation")):
        for row in _read_task(task_split):
            assert in_split(row["text"], corpus_split), (task_split, row["text"])
    for row in _read_task("dev"):
        assert not in_split(row["text"], "train"), row["text"]


def test_read_documents_skips_bad_lines_and_empty_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(
        b"\n"                        # Leading blank line: an empty document.
        b"first one.\r\n"
        b"\xff\xfe bad\n"            # Not UTF-8: dropped.
        b"first two.\n"
        b"\n\n\n"                    # Two extra blank lines: two empty documents.
        b"  second one.  \n"
        b"\n"
        b"\xff\xfe bad\n"            # A document made only of a bad line.
        b"\n"
        b"caf\xc3\xa9.\n"            # Valid UTF-8 is kept.
        b"\xc3\x28\n"                # Invalid continuation byte: dropped.
    )
    documents, stats = bundled.read_documents(path)
    assert documents == [["first one.", "first two."], ["second one."], ["café."]]
    assert stats == bundled.ReadStats(lines=13, skipped_non_utf8=3, empty_documents_skipped=4)

    gz_path = tmp_path / "corpus.txt.gz"
    gz_path.write_bytes(gzip.compress(path.read_bytes()))
    assert bundled.read_documents(gz_path) == (documents, stats)


def test_read_documents_ends_on_bad_document_and_bom(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbfone.\n\n\xff\xfe bad")
    documents, stats = bundled.read_documents(path)
    assert documents == [["one."]]
    assert stats == bundled.ReadStats(lines=3, skipped_non_utf8=1, empty_documents_skipped=1)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert bundled.read_documents(empty) == ([], bundled.ReadStats(0, 0, 0))
