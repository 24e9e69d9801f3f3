"""Document sources: where the pretraining text comes from.

A *document* is a list of sentences (``list[str]``). A source turns the data config and a
split ("train" or "eval") into :class:`Documents`. Sources are registered by name in
:data:`SOURCES` (``data_cfg.source`` picks one):

- ``"bundled"``: the King James Bible corpus shipped in :mod:`bert_jax.data.bundled`
  (train -> "train", eval -> "validation").
- ``"text"``: text files matched by ``data_cfg.train_files`` / ``data_cfg.eval_files``
  (comma-separated globs, plain or ``.gz``) in one of the layouts of
  ``data_cfg.text_format``:

  * ``"sentences"``: one sentence per line, a blank line between documents (the format
    of the original BERT pretraining data).
  * ``"lines"``: one document per line, split into sentences after ``.``, ``!`` or ``?``
    followed by whitespace.
  * ``"plain"``: no structure; each file is one document whose sentences are its
    non-blank lines. Such a source has no document boundaries (``has_document_boundaries``
    is False), so it cannot feed NSP/SOP.

- ``"tfds"``: a TensorFlow Datasets dataset prepared as ``array_record``, read through
  ``tfds.data_source`` (random access, no TensorFlow needed); ``data_cfg.tfds_text_key``
  names the text feature, each record is a document, split into sentences at newlines
  and then at sentence punctuation.

Every source skips lines that are not valid UTF-8 and counts them.

A source also gives a *fingerprint*: what identifies its output (config fields, file
names, sizes and modification times), used to key the tokenized-corpus cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import pathlib
import re
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import logging

from bert_jax.data import bundled

SPLITS: tuple[str, ...] = ("train", "eval")
TEXT_FORMATS: tuple[str, ...] = ("sentences", "lines", "plain")

# A sentence ends at ., ! or ? (optionally followed by a closing quote or bracket) and
# whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")


@dataclasses.dataclass(frozen=True)
class SourceStats:
    """What a source read.

    Attributes:
      documents: documents returned.
      sentences: sentences returned (over all documents).
      skipped_non_utf8: lines (or tfds records) dropped for not being valid UTF-8.
      empty_documents_skipped: documents dropped for having no sentence.
      has_document_boundaries: whether documents are real documents (needed by NSP/SOP
        and by ``packing="doc_sentences"``).
      description: what was read, for logs (file globs, dataset name and split).
    """

    documents: int
    sentences: int
    skipped_non_utf8: int
    empty_documents_skipped: int
    has_document_boundaries: bool
    description: str = ""


@dataclasses.dataclass(frozen=True)
class Documents:
    """Documents of a source and the stats of reading them.

    The stats are also readable directly (``docs.sentences``, ``docs.skipped_non_utf8``,
    ``docs.empty_documents_skipped``, ``docs.has_document_boundaries``,
    ``docs.num_documents``).

    Attributes:
      documents: the documents, each a non-empty list of non-empty sentences.
      stats: counts and flags, see :class:`SourceStats`.
    """

    documents: list[list[str]]
    stats: SourceStats

    @property
    def num_documents(self) -> int:
        return self.stats.documents

    @property
    def sentences(self) -> int:
        """Number of sentences."""
        return self.stats.sentences

    @property
    def skipped_non_utf8(self) -> int:
        return self.stats.skipped_non_utf8

    @property
    def empty_documents_skipped(self) -> int:
        return self.stats.empty_documents_skipped

    @property
    def has_document_boundaries(self) -> bool:
        return self.stats.has_document_boundaries


@dataclasses.dataclass(frozen=True)
class Source:
    """A registered document source.

    Attributes:
      load: ``(data_cfg, split) -> Documents``.
      fingerprint: ``(data_cfg, split) -> JSON-able`` identifying what ``load`` would
        return, cheaply (without reading the documents).
    """

    load: Callable[[ml_collections.ConfigDict, str], Documents]
    fingerprint: Callable[[ml_collections.ConfigDict, str], Any]


def split_sentences(text: str) -> list[str]:
    """Splits text into sentences at newlines, then after ``.``/``!``/``?`` + whitespace.

    Returns the non-empty, stripped sentences.
    """
    out: list[str] = []
    for line in text.splitlines():
        out.extend(s for s in (p.strip() for p in _SENTENCE_END.split(line)) if s)
    return out


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


# ---------------------------------------------------------------------------- bundled


def _bundled_split(split: str) -> str:
    _check_split(split)
    return {"train": "train", "eval": "validation"}[split]


def _load_bundled(data_cfg: ml_collections.ConfigDict, split: str) -> Documents:
    path = bundled.corpus_path(_bundled_split(split))
    docs, read = bundled.read_documents(path)
    return _make_documents(
        docs,
        skipped_non_utf8=read.skipped_non_utf8,
        empty_documents_skipped=read.empty_documents_skipped,
        has_document_boundaries=True,
        description=f"bundled corpus {path.name}",
    )


def _fingerprint_bundled(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
    path = bundled.corpus_path(_bundled_split(split))
    return {"source": "bundled", "files": _file_fingerprints([path])}


# ------------------------------------------------------------------------------- text


def _text_globs(data_cfg: ml_collections.ConfigDict, split: str) -> str:
    _check_split(split)
    field = {"train": "train_files", "eval": "eval_files"}[split]
    globs = data_cfg.get(field) or ""
    if not globs.strip():
        raise ValueError(f"data.source='text' needs data.{field} (comma-separated globs).")
    return globs


def _expand_globs(globs: str) -> list[pathlib.Path]:
    """Files matched by comma-separated globs, each glob sorted, in the order given."""
    files: list[pathlib.Path] = []
    for pattern in (g.strip() for g in globs.split(",")):
        if not pattern:
            continue
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise ValueError(f"No file matches {pattern!r}.")
        files.extend(pathlib.Path(m) for m in matched)
    return files


def _file_fingerprints(files: list[pathlib.Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _text_format(data_cfg: ml_collections.ConfigDict) -> str:
    fmt = data_cfg.get("text_format") or "sentences"
    if fmt not in TEXT_FORMATS:
        raise ValueError(
            f"Unknown data.text_format {fmt!r}; valid formats: {', '.join(TEXT_FORMATS)}."
        )
    return fmt


def _load_text(data_cfg: ml_collections.ConfigDict, split: str) -> Documents:
    globs = _text_globs(data_cfg, split)
    fmt = _text_format(data_cfg)
    files = _expand_globs(globs)
    docs: list[list[str]] = []
    skipped = empty = 0
    for path in files:
        file_docs, read = bundled.read_documents(path)
        skipped += read.skipped_non_utf8
        if read.skipped_non_utf8:
            warn_non_utf8(str(path), read.skipped_non_utf8, read.lines)
        if fmt == "sentences":
            docs.extend(file_docs)
            empty += read.empty_documents_skipped
        elif fmt == "lines":
            lines = [s for d in file_docs for s in d]
            empty += read.lines - read.skipped_non_utf8 - len(lines)  # Blank lines.
            for line in lines:
                sentences = split_sentences(line)
                if sentences:
                    docs.append(sentences)
        else:  # plain: the whole file is one document of its lines.
            lines = [s for d in file_docs for s in d]
            if lines:
                docs.append(lines)
            else:
                empty += 1
    if not docs:
        raise ValueError(
            f"No text in {globs!r} ({len(files)} file(s), {skipped} non-UTF-8 line(s) "
            "skipped)."
        )
    return _make_documents(
        docs,
        skipped_non_utf8=skipped,
        empty_documents_skipped=empty,
        has_document_boundaries=fmt != "plain",
        description=f"text {globs!r} ({len(files)} file(s), format {fmt!r})",
    )


def warn_non_utf8(where: str, skipped: int, lines: int | None = None) -> str:
    """A console warning (absl WARNING, shown by the launchers) counting dropped lines."""
    of = f" of {lines:,}" if lines else ""
    share = f" ({skipped / lines:.1%})" if lines else ""
    message = (f"{where}: {skipped:,}{of} lines{share} are not valid UTF-8 and were skipped. "
               "If the file is in another encoding, convert it (e.g. `iconv -f latin1 -t "
               "utf-8 FILE > FILE.utf8`) and point data.*_files at the result.")
    logging.warning("%s", message)
    return message


def _fingerprint_text(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
    globs = _text_globs(data_cfg, split)
    return {
        "source": "text",
        "format": _text_format(data_cfg),
        "files": _file_fingerprints(_expand_globs(globs)),
    }


# ------------------------------------------------------------------------------- tfds


def _tfds_split(data_cfg: ml_collections.ConfigDict, split: str) -> str:
    _check_split(split)
    field = {"train": "train_split", "eval": "eval_split"}[split]
    value = data_cfg.get(field)
    if not value:
        raise ValueError(f"data.source='tfds' needs data.{field}.")
    return value


def _open_tfds(data_cfg: ml_collections.ConfigDict, split: str):
    """``tfds.data_source`` for the configured dataset and split, with clear errors."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text  # noqa: F401  (registers the text datasets)

    name = data_cfg.get("tfds_name") or ""
    if not name:
        raise ValueError("data.source='tfds' needs data.tfds_name.")
    tfds_split = _tfds_split(data_cfg, split)
    data_dir = data_cfg.get("tfds_data_dir") or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(
            base, tfds.list_builders(with_community_datasets=False), n=5
        )
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(f"Unknown tfds dataset {name!r}.{hint}") from e
    except (ValueError, KeyError) as e:  # e.g. an unknown config of a known dataset.
        raise ValueError(f"Cannot build tfds dataset {name!r}: {e}") from e
    try:
        return tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001  (tfds raises many types; all mean "cannot read")
        splits = ", ".join(sorted(builder.info.splits.keys())) or "none prepared"
        raise ValueError(
            f"Cannot read split {tfds_split!r} of tfds dataset {name!r} from "
            f"{builder.data_dir} (available splits: {splits}). Prepare it first with "
            f"`tfds build {name} --file_format=array_record`. ({type(e).__name__}: {e})"
        ) from e


def _as_text(value: Any) -> str | None:
    """A tfds text feature as str (bytes decoded as UTF-8); None if not valid UTF-8."""
    if hasattr(value, "item") and not isinstance(value, (bytes, str)):
        value = value.item()  # A 0-d numpy array.
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(value)


def _load_tfds(data_cfg: ml_collections.ConfigDict, split: str) -> Documents:
    from tqdm import tqdm

    source = _open_tfds(data_cfg, split)
    key = data_cfg.get("tfds_text_key") or "text"
    name = data_cfg.tfds_name
    n = len(source)
    docs: list[list[str]] = []
    skipped = empty = 0
    import grain

    # grain reads the records in order, with parallel prefetching.
    records = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=8, prefetch_buffer_size=256)
    )
    with tqdm(total=n, desc=f"reading {name}", unit="doc", disable=n < 10_000) as bar:
        for record in records:
            bar.update(1)
            if key not in record:
                raise ValueError(
                    f"tfds dataset {name!r} has no feature {key!r}; its records have "
                    f"{', '.join(sorted(record))}. Set data.tfds_text_key."
                )
            text = _as_text(record[key])
            if text is None:
                skipped += 1
                continue
            sentences = split_sentences(text)
            if sentences:
                docs.append(sentences)
            else:
                empty += 1
    if not docs:
        raise ValueError(f"No text in tfds dataset {name!r} split {_tfds_split(data_cfg, split)!r}.")
    return _make_documents(
        docs,
        skipped_non_utf8=skipped,
        empty_documents_skipped=empty,
        has_document_boundaries=True,
        description=f"tfds {name!r} split {_tfds_split(data_cfg, split)!r}",
    )


def _fingerprint_tfds(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
    return {
        "source": "tfds",
        "name": data_cfg.get("tfds_name"),
        "split": _tfds_split(data_cfg, split),
        "data_dir": str(data_cfg.get("tfds_data_dir") or ""),
        "text_key": data_cfg.get("tfds_text_key") or "text",
    }


# --------------------------------------------------------------------------- registry


def _make_documents(
    docs: list[list[str]],
    *,
    skipped_non_utf8: int,
    empty_documents_skipped: int,
    has_document_boundaries: bool,
    description: str,
) -> Documents:
    stats = SourceStats(
        documents=len(docs),
        sentences=sum(len(d) for d in docs),
        skipped_non_utf8=skipped_non_utf8,
        empty_documents_skipped=empty_documents_skipped,
        has_document_boundaries=has_document_boundaries,
        description=description,
    )
    return Documents(documents=docs, stats=stats)


SOURCES: dict[str, Source] = {
    "bundled": Source(load=_load_bundled, fingerprint=_fingerprint_bundled),
    "text": Source(load=_load_text, fingerprint=_fingerprint_text),
    "tfds": Source(load=_load_tfds, fingerprint=_fingerprint_tfds),
}


def register_source(name: str, source: Source) -> None:
    """Adds a document source under ``name`` (selectable as ``data_cfg.source``)."""
    if name in SOURCES:
        raise ValueError(f"Source {name!r} is already registered.")
    SOURCES[name] = source


def get_source(data_cfg: ml_collections.ConfigDict) -> Source:
    """The registered source named by ``data_cfg.source``.

    Raises:
      ValueError: for an unknown name (listing the known ones).
    """
    name = data_cfg.get("source")
    if name not in SOURCES:
        raise ValueError(
            f"Unknown data.source {name!r}; registered sources: {', '.join(sorted(SOURCES))}."
        )
    return SOURCES[name]


def load_documents(data_cfg: ml_collections.ConfigDict, split: str) -> Documents:
    """Reads the documents of ``split`` ("train" or "eval") from the configured source."""
    _check_split(split)
    docs = get_source(data_cfg).load(data_cfg, split)
    s = docs.stats
    logging.info(
        "Read %s: %d documents, %d sentences (%d non-UTF-8 lines skipped, %d empty "
        "documents skipped).",
        s.description, s.documents, s.sentences, s.skipped_non_utf8, s.empty_documents_skipped,
    )
    return docs


def source_fingerprint(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
    """JSON-able identity of what :func:`load_documents` would return for ``split``."""
    _check_split(split)
    return {"split": split, **get_source(data_cfg).fingerprint(data_cfg, split)}
