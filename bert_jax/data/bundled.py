"""The corpus and labelled task shipped with the package, and the text-file reader.

Everything under ``bert_jax/data/bundled/`` is built from the King James Bible (public
domain) by ``launch/build_bundled_corpus.py`` and committed, so pretraining and
fine-tuning work offline with no download. See ``bert_jax/data/bundled/README.md`` for
provenance, the split rule and sizes.

Corpus files use the format of the original BERT pretraining data: one sentence per line,
a blank line between documents. :func:`read_documents` reads that format from the bundled
files and from user-supplied text files alike.

The labelled task is JSON lines, one ``{"text", "label", "label_name"}`` object per line;
:func:`task_path` and :func:`task_label_names` locate it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
from typing import BinaryIO

BUNDLED_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "bundled"

CORPUS_SPLITS: tuple[str, ...] = ("train", "validation")
TASK_SPLITS: tuple[str, ...] = ("train", "dev")

_CORPUS_FILES: dict[str, str] = {
    "train": "kjv_train.txt.gz",
    "validation": "kjv_valid.txt.gz",
}
_TASK_FILES: dict[str, str] = {
    "train": "kjv_task_train.jsonl.gz",
    "dev": "kjv_task_dev.jsonl.gz",
}
TASK_LABELS_FILE: str = "kjv_task_labels.json"


@dataclasses.dataclass(frozen=True)
class ReadStats:
    """What :func:`read_documents` saw besides the documents it returned.

    Attributes:
      lines: physical lines read, blank and skipped ones included.
      skipped_non_utf8: lines dropped because they are not valid UTF-8.
      empty_documents_skipped: documents with no sentence left (runs of blank lines, or a
        document whose every line was dropped), which are not returned.
    """

    lines: int
    skipped_non_utf8: int
    empty_documents_skipped: int


def corpus_path(split: str) -> pathlib.Path:
    """Path of the bundled corpus file for ``split`` (one of :data:`CORPUS_SPLITS`).

    Raises:
      ValueError: if ``split`` is not a corpus split.
    """
    if split not in _CORPUS_FILES:
        raise ValueError(
            f"Unknown bundled corpus split {split!r}; valid splits: {', '.join(CORPUS_SPLITS)}."
        )
    return BUNDLED_DIR / _CORPUS_FILES[split]


def task_path(split: str) -> pathlib.Path:
    """Path of the bundled labelled-task file for ``split`` (one of :data:`TASK_SPLITS`).

    Each line of the gzipped file is a JSON object ``{"text": str, "label": int,
    "label_name": str}``.

    Raises:
      ValueError: if ``split`` is not a task split.
    """
    if split not in _TASK_FILES:
        raise ValueError(
            f"Unknown bundled task split {split!r}; valid splits: {', '.join(TASK_SPLITS)}."
        )
    return BUNDLED_DIR / _TASK_FILES[split]


def task_label_names() -> list[str]:
    """Names of the bundled task's classes; label ``i`` is ``task_label_names()[i]``."""
    with open(BUNDLED_DIR / TASK_LABELS_FILE, encoding="utf-8") as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{BUNDLED_DIR / TASK_LABELS_FILE} must hold a JSON list of strings.")
    return names


def _open_binary(path: pathlib.Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def read_documents(path: str | os.PathLike[str]) -> tuple[list[list[str]], ReadStats]:
    """Reads a "one sentence per line, blank line between documents" text file.

    The file is plain text, or gzip when its name ends in ``.gz``. It is streamed in binary
    and each line decoded on its own, so one bad line costs only that line:

    - a line that is not valid UTF-8 is dropped and counted;
    - surrounding whitespace (``\\r`` of Windows line ends included) is stripped, and a
      line that is then empty (or whitespace only) ends the current document;
    - a UTF-8 byte-order mark at the start of the file is ignored;
    - documents left with no sentence (several blank lines in a row, leading or trailing
      blank lines, or a document made only of dropped lines) are not returned, and counted.

    Args:
      path: the text file.

    Returns:
      ``(documents, stats)``: documents as lists of sentences, in file order, and a
      :class:`ReadStats` with the line, dropped-line and empty-document counts.
    """
    path = pathlib.Path(path)
    documents: list[list[str]] = []
    current: list[str] = []
    lines = skipped_non_utf8 = empty_documents = 0
    dropped_in_current = False  # The current document lost a line to bad UTF-8.
    with _open_binary(path) as f:
        for raw in f:
            lines += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped_non_utf8 += 1
                dropped_in_current = True
                continue
            if lines == 1:
                line = line.lstrip("\ufeff")
            line = line.strip()
            if line:
                current.append(line)
            elif current:
                documents.append(current)
                current, dropped_in_current = [], False
            else:  # A blank line closing a document with no sentence.
                empty_documents += 1
                dropped_in_current = False
    if current:
        documents.append(current)
    elif dropped_in_current:  # The file ended on a document made only of dropped lines.
        empty_documents += 1
    return documents, ReadStats(
        lines=lines,
        skipped_non_utf8=skipped_non_utf8,
        empty_documents_skipped=empty_documents,
    )
