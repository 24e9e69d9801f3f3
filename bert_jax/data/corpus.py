"""A tokenized corpus as flat numpy arrays, and its on-disk cache.

:class:`TokenizedCorpus` keeps every sentence's token ids back to back in one int32 array,
with offsets marking sentences and documents, so example builders can cut token spans
out of it by index. :func:`load_corpus` tokenizes a configured source once and caches the
result as ``.npz`` keyed by the source, the split and the tokenizer's bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from bert_jax.data import sources
from bert_jax.data import tokenizer as tokenizer_lib

# Bump when the cached arrays' meaning changes.
CACHE_VERSION = 2  # 2: special tokens' text split off before encoding (tokenizer.py)
# Sentences tokenized per call (the progress bar's step).
_TOKENIZE_CHUNK = 8192
# Below this many sentences no progress bar is shown.
_PROGRESS_MIN_SENTENCES = 50_000


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """Token ids of all sentences of all documents, flat.

    Attributes:
      ids: int32 [T], the tokens of every sentence back to back (no special tokens).
      word_start: bool [T], True where a token begins a word: a piece starting with the
        word-boundary marker, and the first token of every sentence.
      sent_offsets: int64 [S+1], sentence ``s`` is ``ids[sent_offsets[s]:sent_offsets[s+1]]``;
        every sentence has at least one token.
      doc_offsets: int64 [D+1], document ``d`` is sentences
        ``doc_offsets[d]:doc_offsets[d+1]``; every document has at least one sentence.
    """

    ids: np.ndarray
    word_start: np.ndarray
    sent_offsets: np.ndarray
    doc_offsets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_sentences(self) -> int:
        return int(self.sent_offsets.shape[0]) - 1

    @property
    def num_documents(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    @property
    def doc_token_offsets(self) -> np.ndarray:
        """int64 [D+1]: document ``d`` is ``ids[doc_token_offsets[d]:doc_token_offsets[d+1]]``."""
        return self.sent_offsets[self.doc_offsets]

    @property
    def sentence_lengths(self) -> np.ndarray:
        """int64 [S]: tokens per sentence."""
        return np.diff(self.sent_offsets)

    def validate(self) -> None:
        """Raises ValueError if the arrays are inconsistent."""
        ok = (
            self.ids.ndim == 1
            and self.word_start.shape == self.ids.shape
            and self.sent_offsets[0] == 0
            and self.sent_offsets[-1] == self.ids.shape[0]
            and np.all(np.diff(self.sent_offsets) > 0)
            and self.doc_offsets[0] == 0
            and self.doc_offsets[-1] == self.num_sentences
            and np.all(np.diff(self.doc_offsets) > 0)
        )
        if not ok:
            raise ValueError("Inconsistent TokenizedCorpus arrays.")


def tokenize_documents(
    docs: Sequence[Sequence[str]],
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    progress: bool | None = None,
) -> TokenizedCorpus:
    """Tokenizes documents into a :class:`TokenizedCorpus`.

    Sentences that tokenize to nothing are dropped, and so are documents left with no
    sentence.

    Args:
      docs: documents as lists of sentences.
      tokenizer: the tokenizer.
      progress: show a tqdm bar; default: only for corpora of 50k sentences or more.
    """
    from tqdm import tqdm

    flat = [s for d in docs for s in d]
    doc_sizes = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if progress is None:
        progress = len(flat) >= _PROGRESS_MIN_SENTENCES
    id_chunks: list[np.ndarray] = []
    length_chunks: list[np.ndarray] = []
    with tqdm(total=len(flat), desc="tokenizing", unit="sent", disable=not progress) as bar:
        for start in range(0, len(flat), _TOKENIZE_CHUNK):
            part = flat[start : start + _TOKENIZE_CHUNK]
            encoded = tokenizer.encode_batch(part)
            part_lengths = np.fromiter((len(e) for e in encoded), np.int64, len(encoded))
            id_chunks.append(
                np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(part_lengths.sum()))
            )
            length_chunks.append(part_lengths)
            bar.update(len(part))
    ids = np.concatenate(id_chunks) if id_chunks else np.zeros([0], np.int32)
    lengths = np.concatenate(length_chunks) if length_chunks else np.zeros([0], np.int64)
    # Empty sentences add no ids; drop their offsets, then documents with no sentence.
    keep = lengths > 0
    sent_doc = np.repeat(np.arange(len(docs)), doc_sizes)
    kept_per_doc = np.bincount(sent_doc[keep], minlength=len(docs))
    kept_per_doc = kept_per_doc[kept_per_doc > 0]
    lengths = lengths[keep]
    sent_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(kept_per_doc)]).astype(np.int64)
    word_start = np.asarray(tokenizer.word_starts(ids), dtype=bool).copy()
    word_start[sent_offsets[:-1]] = True
    corpus = TokenizedCorpus(
        ids=ids, word_start=word_start, sent_offsets=sent_offsets, doc_offsets=doc_offsets
    )
    if corpus.num_sentences:
        corpus.validate()
    return corpus


def cache_key(
    data_cfg: ml_collections.ConfigDict, split: str, tokenizer: tokenizer_lib.Tokenizer
) -> str:
    """Hex digest naming the cache file of (source config, split, tokenizer)."""
    payload = {
        "version": CACHE_VERSION,
        "source": sources.source_fingerprint(data_cfg, split),
        "tokenizer": tokenizer.fingerprint,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def _save(path: pathlib.Path, corpus: TokenizedCorpus, stats: sources.SourceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(
            tmp,
            ids=corpus.ids,
            word_start=corpus.word_start,
            sent_offsets=corpus.sent_offsets,
            doc_offsets=corpus.doc_offsets,
            stats=np.array(json.dumps(dataclasses.asdict(stats))),
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load(path: pathlib.Path) -> tuple[TokenizedCorpus, sources.SourceStats]:
    with np.load(path, allow_pickle=False) as z:
        corpus = TokenizedCorpus(
            ids=z["ids"],
            word_start=z["word_start"],
            sent_offsets=z["sent_offsets"],
            doc_offsets=z["doc_offsets"],
        )
        stats = sources.SourceStats(**json.loads(str(z["stats"])))
    return corpus, stats


def load_corpus(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    tokenizer: tokenizer_lib.Tokenizer,
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[TokenizedCorpus, sources.SourceStats]:
    """The tokenized corpus of ``split``, from the cache when it holds it.

    The cache file is ``cache_dir/corpus-{split}-{key}.npz`` with ``key`` from
    :func:`cache_key` (source config and files' sizes and times, split, tokenizer bytes);
    written atomically, so concurrent hosts writing the same file are harmless.

    Args:
      data_cfg: the data config (source fields).
      split: "train" or "eval".
      tokenizer: the tokenizer.
      cache_dir: where cache files live; None disables the cache.

    Returns:
      ``(corpus, stats)``, stats as the source reported them when it was read.
    """
    path = None
    if cache_dir is not None:
        path = pathlib.Path(cache_dir) / f"corpus-{split}-{cache_key(data_cfg, split, tokenizer)}.npz"
        if path.is_file():
            try:
                corpus, stats = _load(path)
                corpus.validate()
                logging.info("Loaded tokenized %s corpus from cache %s.", split, path)
                return corpus, stats
            except (OSError, ValueError, KeyError, TypeError) as e:
                logging.warning("Ignoring unreadable corpus cache %s: %s", path, e)
    docs = sources.load_documents(data_cfg, split)
    corpus = tokenize_documents(docs.documents, tokenizer)
    if corpus.num_sentences == 0:
        raise ValueError(f"The {split} corpus ({docs.stats.description}) has no tokens.")
    if path is not None:
        _save(path, corpus, docs.stats)
        logging.info("Cached tokenized %s corpus in %s.", split, path)
    return corpus, docs.stats
