"""Tokenizers: a small protocol, its sentencepiece implementation, and training one.

Our own sentencepiece models reserve fixed ids for the special tokens:

====== ====
piece   id
====== ====
[PAD]   0
[UNK]   1
[CLS]   2
[SEP]   3
[MASK]  4
====== ====

and regular pieces start at :data:`FIRST_REGULAR_ID` (5). This is also the layout of
ALBERT's released sentencepiece models. Other sentencepiece models load too: the special
ids are then looked up by piece name (``[CLS]`` or ``<s>``-style names, see
:class:`SentencePieceTokenizer`).

The literal text of a special token (``"[MASK]"``, ``"[SEP]"``, ...) in a corpus encodes
to its id, and the text between special tokens is encoded on its own, exactly as a Hugging
Face tokenizer splits off its added tokens first: ``"the [MASK] of"`` is ``▁the [MASK] ▁of``
(what a masked position looks like in training) and the tokenizer exported by
``bert_jax.hf.sentencepiece_to_hf`` gives the same ids. (Sentencepiece alone would emit a
lone ``▁`` before a user-defined symbol; the original BERT tokenizer would split the text
into ``[``, ``MASK``, ``]``.)

:func:`ensure_tokenizer` is what a training run calls: it loads the configured tokenizer,
or the one already in the workdir, or trains one from the configured corpus and keeps it
in the workdir.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np
import sentencepiece as spm
from absl import logging

PAD_PIECE = "[PAD]"
UNK_PIECE = "[UNK]"
CLS_PIECE = "[CLS]"
SEP_PIECE = "[SEP]"
MASK_PIECE = "[MASK]"

PAD_ID = 0
UNK_ID = 1
CLS_ID = 2
SEP_ID = 3
MASK_ID = 4
FIRST_REGULAR_ID = 5

MODEL_FILENAME = "tokenizer.model"
WORD_BOUNDARY = "\u2581"  # "▁", sentencepiece's word-boundary marker.

# Number of trainer threads. The unigram trainer's result depends on the thread count
# (work is split per thread), so it is fixed rather than taken from the machine: the same
# corpus gives the same model everywhere.
TRAIN_NUM_THREADS = 4

# Default cap on the sentences ensure_tokenizer trains on (evenly spaced over the corpus).
ENSURE_MAX_SENTENCES = 5_000_000

# Fallback piece names tried, in order, when a sentencepiece model lacks our names.
_SPECIAL_ALIASES: dict[str, tuple[str, ...]] = {
    "pad": (PAD_PIECE, "<pad>"),
    "unk": (UNK_PIECE, "<unk>"),
    "cls": (CLS_PIECE, "<cls>", "<s>"),
    "sep": (SEP_PIECE, "<sep>", "</s>"),
    "mask": (MASK_PIECE, "<mask>"),
}


class Tokenizer(abc.ABC):
    """What the data pipeline and the objectives need from a tokenizer.

    Kept small on purpose so that other implementations (a Hugging Face ``tokenizer.json``
    for imported models) can be added next to :class:`SentencePieceTokenizer`.
    """

    @property
    @abc.abstractmethod
    def pad_id(self) -> int:
        """Id of the padding token."""

    @property
    @abc.abstractmethod
    def unk_id(self) -> int:
        """Id of the unknown token."""

    @property
    @abc.abstractmethod
    def cls_id(self) -> int:
        """Id of the classification token that starts every example."""

    @property
    @abc.abstractmethod
    def sep_id(self) -> int:
        """Id of the separator token that ends every segment."""

    @property
    @abc.abstractmethod
    def mask_id(self) -> int:
        """Id of the mask token used by MLM-style corruptions."""

    @property
    @abc.abstractmethod
    def first_regular_id(self) -> int:
        """Smallest id of a regular (non-special) token; regular ids are
        ``[first_regular_id, vocab_size)``, e.g. the range MLM draws random tokens from."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (specials included)."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A hex digest of the model's bytes: equal fingerprints mean equal tokenizations
        (used to key caches of tokenized corpora)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no special tokens added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts; implementations may parallelize it."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def word_starts(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Bool array, True where the token begins a new word (for whole-word masking)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens other than padding are rendered by name."""

    def pieces(self) -> list[str]:
        """The vocabulary's pieces, by id (what host-side example features read, e.g. which
        ids start with an uppercase letter)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its pieces")

    @abc.abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        """Writes the tokenizer into ``directory`` and returns the written file's path."""


class _TableTokenizer(Tokenizer):
    """The parts both implementations share: special ids found at load time (``_ids``,
    ``_first_regular``, ``_vocab_size``) and a per-id word-start table."""

    _ids: dict[str, int]
    _first_regular: int
    _vocab_size: int
    _word_start_table: np.ndarray

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def cls_id(self) -> int:
        return self._ids["cls"]

    @property
    def sep_id(self) -> int:
        return self._ids["sep"]

    @property
    def mask_id(self) -> int:
        return self._ids["mask"]

    @property
    def first_regular_id(self) -> int:
        return self._first_regular

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def word_starts(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._word_start_table[np.asarray(ids, dtype=np.int64)]

    def pieces(self) -> list[str]:
        return list(self._pieces)


class SentencePieceTokenizer(_TableTokenizer):
    """A :class:`Tokenizer` backed by a sentencepiece model file.

    Special ids are taken from the model: the pad and unk ids sentencepiece records, else
    the first of these piece names present: ``[PAD]``/``<pad>``, ``[UNK]``/``<unk>``,
    ``[CLS]``/``<cls>``/``<s>``, ``[SEP]``/``<sep>``/``</s>``, ``[MASK]``/``<mask>``.

    Args:
      model_path: a ``.model`` file, or a directory holding ``tokenizer.model``.

    Raises:
      ValueError: if the file is missing or the model lacks a needed special token.
    """

    def __init__(self, model_path: str | os.PathLike[str]):
        path = pathlib.Path(model_path)
        if path.is_dir():
            path = path / MODEL_FILENAME
        if not path.is_file():
            raise ValueError(f"No sentencepiece model at {path}.")
        self._path = path
        self._model_bytes = path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        self._fingerprint = hashlib.sha256(self._model_bytes).hexdigest()
        n = self._sp.get_piece_size()
        self._vocab_size = n
        self._ids = {
            "pad": self._sp.pad_id(),
            "unk": self._sp.unk_id(),
        }
        for name, aliases in _SPECIAL_ALIASES.items():
            if self._ids.get(name, -1) >= 0:
                continue
            # piece_to_id answers the unk id for an unknown piece: check the round trip.
            found = [pid for pid in map(self._sp.piece_to_id, aliases)
                     if 0 <= pid < n and self._sp.id_to_piece(pid) in aliases]
            if not found:
                raise ValueError(
                    f"Sentencepiece model {path} has no {name} token (looked for pieces "
                    f"{', '.join(aliases)})."
                )
            self._ids[name] = found[0]
        pieces = [self._sp.id_to_piece(i) for i in range(n)]
        self._pieces = tuple(pieces)
        self._word_start_table = np.array(
            [p.startswith(WORD_BOUNDARY) for p in pieces], dtype=bool
        )
        special = {
            i
            for i in range(n)
            if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i)
        } | set(self._ids.values())
        first = 0
        while first in special:
            first += 1
        self._first_regular = first
        self._special_ids = frozenset(self._ids.values())
        # Split off before encoding, as Hugging Face does with its added tokens (longest
        # first, so that no special is cut by a shorter one).
        specials = sorted({self._sp.id_to_piece(i) for i in self._ids.values()}, key=len,
                          reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, specials)))
        self._special_of = {self._sp.id_to_piece(i): i for i in self._ids.values()}

    @property
    def path(self) -> pathlib.Path:
        """The model file this tokenizer was loaded from."""
        return self._path

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def _segments(self, text: str) -> list[tuple[int, int, int | None]]:
        """(begin, end, special id or None) of the text between and of special tokens."""
        out, pos = [], 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append((pos, m.start(), None))
            out.append((m.start(), m.end(), self._special_of[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((pos, len(text), None))
        return out

    def encode(self, text: str) -> list[int]:
        if self._special_re.search(text) is None:
            return self._sp.encode(text)
        ids: list[int] = []
        for b, e, special in self._segments(text):
            ids.extend([special] if special is not None else self._sp.encode(text[b:e]))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if self._special_re.search(t) is None]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain])):
            out[i] = ids
        for i in sorted(set(range(len(texts))) - set(plain)):
            out[i] = self.encode(texts[i])
        return out

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """(ids, [n, 2] character spans [begin, end) of each piece), ids equal to
        :meth:`encode`. Spans exclude the whitespace a word-boundary marker stands for; a
        piece that is only that marker gets an empty span at the next word."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        for b, e, special in self._segments(text):
            if special is not None:
                ids.append(special)
                spans.append((b, e))
                continue
            part = text[b:e]
            proto = self._sp.encode_as_immutable_proto(part)
            # The immutable proto's begin/end are character offsets already.
            char_of_byte = np.arange(len(part) + 1, dtype=np.int64)
            for p in proto.pieces:
                pb, pe = int(char_of_byte[p.begin]), int(char_of_byte[p.end])
                while pb < pe and part[pb].isspace():
                    pb += 1
                ids.append(p.id)
                spans.append((b + pb, b + pe))
        return ids, np.asarray(spans, np.int64).reshape(-1, 2)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # sentencepiece renders user-defined symbols as their text; padding is dropped.
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        out = pathlib.Path(directory) / MODEL_FILENAME
        _atomic_write(out, self._model_bytes)
        return out

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"


class HFTokenizer(_TableTokenizer):
    """A :class:`Tokenizer` backed by a Hugging Face ``tokenizer.json`` (the ``tokenizers``
    library): BERT's WordPiece, RoBERTa's byte-level BPE, or a unigram model, as imported
    with a checkpoint. Text is normalised as the file says (e.g. lower-cased for uncased
    BERT); special tokens are not added by ``encode`` (the pipeline places them).

    Special ids are looked up by name as for sentencepiece models (``[CLS]`` or ``<s>``...).
    Word starts: a WordPiece piece without the continuation prefix (``##``), a byte-level
    BPE piece with the space marker (``Ġ``), a unigram piece with ``▁``.

    Raises:
      ValueError: if the file is missing or lacks a needed special token.
    """

    FILENAME = "tokenizer.json"

    def __init__(self, path: str | os.PathLike[str]):
        import json

        from tokenizers import Tokenizer as _Rust

        path = pathlib.Path(path)
        if path.is_dir():
            path = path / self.FILENAME
        if not path.is_file():
            raise ValueError(f"No tokenizer.json at {path}.")
        self._path = path
        self._bytes = path.read_bytes()
        self._tok = _Rust.from_str(self._bytes.decode("utf-8"))
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._ids = {}
        for name, aliases in _SPECIAL_ALIASES.items():
            found = [i for i in map(self._tok.token_to_id, aliases) if i is not None]
            if not found:
                raise ValueError(f"{path} has no {name} token (looked for "
                                 f"{', '.join(aliases)}).")
            self._ids[name] = found[0]
        # Specials appended at the end of a vocabulary (RoBERTa's <mask>) do not delimit
        # the regular ids; BERT's [PAD]=0 ... [MASK]=103 do ([unusedN] below stay unused).
        self._first_regular = 1 + max(i for i in self._ids.values() if i < self._vocab_size // 2)
        model = json.loads(self._bytes)["model"]
        pieces = [self._tok.id_to_token(i) or "" for i in range(self._vocab_size)]
        self._pieces = tuple(pieces)
        if model["type"] == "WordPiece":
            prefix = model.get("continuing_subword_prefix") or "##"
            starts = [not p.startswith(prefix) for p in pieces]
        elif model["type"] == "BPE":
            starts = [p.startswith("Ġ") for p in pieces]  # byte-level "Ġ" = a space
        else:
            starts = [p.startswith(WORD_BOUNDARY) for p in pieces]
        self._word_start_table = np.array(starts, dtype=bool)
        self._word_start_table[list(self._ids.values())] = True

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._bytes).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """(ids, [n, 2] character spans of the pieces, leading whitespace excluded)."""
        e = self._tok.encode(text, add_special_tokens=False)
        spans = []
        for b, end in e.offsets:
            while b < end and text[b].isspace():
                b += 1
            spans.append((b, end))
        return e.ids, np.asarray(spans, np.int64).reshape(-1, 2)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id],
                                skip_special_tokens=False)

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        out = pathlib.Path(directory) / self.FILENAME
        _atomic_write(out, self._bytes)
        return out

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self._path)!r}, vocab_size={self.vocab_size})"


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _select_sentences(sentences: Iterable[str], max_sentences: int | None) -> list[str]:
    """Non-empty sentences in input order; if more than ``max_sentences``, an evenly
    spaced (deterministic) subset of them."""
    selected = [s for s in (x.strip() for x in sentences) if s]
    if max_sentences is not None and len(selected) > max_sentences:
        idx = np.linspace(0, len(selected) - 1, num=max_sentences).round().astype(np.int64)
        selected = [selected[i] for i in np.unique(idx)]
    return selected


def train_tokenizer(
    sentences: Iterable[str],
    out_dir: str | os.PathLike[str],
    vocab_size: int = 8000,
    model_type: str = "unigram",
    seed: int = 0,
    max_sentences: int | None = None,
    num_threads: int = TRAIN_NUM_THREADS,
) -> pathlib.Path:
    """Trains a sentencepiece model with our special-token layout.

    Deterministic: the sentences are fed in the given order (no sampling or shuffling by
    sentencepiece), the random seed and the thread count are fixed.

    ``vocab_size`` is a soft limit (sentencepiece's ``hard_vocab_limit=False``): on a
    corpus too small for it, the model gets the largest vocabulary the corpus supports
    instead of failing. The actual size is logged and is ``Tokenizer.vocab_size``.

    Args:
      sentences: training text, one sentence (or line) per item; blank items are ignored.
      out_dir: where ``tokenizer.model`` and ``tokenizer.vocab`` are written.
      vocab_size: wanted number of pieces, specials included.
      model_type: sentencepiece model type: "unigram", "bpe", "char" or "word".
      seed: sentencepiece's random seed.
      max_sentences: train on at most this many sentences, evenly spaced over the input.
      num_threads: trainer threads; the model depends on it, so keep it fixed.

    Returns:
      Path of the written ``tokenizer.model``.

    Raises:
      ValueError: if there are no non-empty sentences.
    """
    selected = _select_sentences(sentences, max_sentences)
    if not selected:
        raise ValueError("Cannot train a tokenizer: no non-empty sentences were given.")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logging.info(
        "Training a %s sentencepiece tokenizer (vocab_size=%d) on %d sentences into %s.",
        model_type, vocab_size, len(selected), out_dir,
    )
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(selected),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID,
        pad_piece=PAD_PIECE,
        unk_id=UNK_ID,
        unk_piece=UNK_PIECE,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=[CLS_PIECE, SEP_PIECE, MASK_PIECE],
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        byte_fallback=False,
        num_threads=num_threads,
        minloglevel=2,
    )
    model_path = out_dir / MODEL_FILENAME
    _atomic_write(model_path, model.getvalue())
    tok = SentencePieceTokenizer(model_path)
    ids = (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)
    if ids != (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID) or tok.first_regular_id != FIRST_REGULAR_ID:
        raise AssertionError(f"Unexpected special ids {ids} in the trained model {model_path}.")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab_text = "".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())
    )
    _atomic_write(out_dir / "tokenizer.vocab", vocab_text.encode("utf-8"))
    if tok.vocab_size != vocab_size:
        logging.warning(
            "Tokenizer has %d pieces instead of the %d asked (corpus too small for more).",
            tok.vocab_size, vocab_size,
        )
    logging.info("Wrote %s (%d pieces).", model_path, tok.vocab_size)
    return model_path


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Loads a tokenizer: a sentencepiece ``.model`` file, a Hugging Face
    ``tokenizer.json``, or a directory holding ``tokenizer.model`` or ``tokenizer.json``.

    Raises:
      ValueError: if nothing loadable is at ``path``.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        p = workdir_tokenizer(p) or p
    if p.is_file() and p.suffix == ".json":
        return HFTokenizer(p)
    if not p.is_file():
        raise ValueError(f"No tokenizer at {path} (expected a sentencepiece .model file, a "
                         f"tokenizer.json, or a directory holding {MODEL_FILENAME} or "
                         f"{HFTokenizer.FILENAME}).")
    return SentencePieceTokenizer(p)


def workdir_tokenizer(directory: str | os.PathLike[str]) -> pathlib.Path | None:
    """The tokenizer file a workdir holds (``tokenizer.model`` or ``tokenizer.json``)."""
    for name in (MODEL_FILENAME, HFTokenizer.FILENAME):
        if (pathlib.Path(directory) / name).is_file():
            return pathlib.Path(directory) / name
    return None


def ensure_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a run, kept in its workdir.

    In order:

    1. ``data_cfg.tokenizer`` set (else, with ``data_cfg.prepared``, the prepared
       directory's tokenizer): load it, and copy it to ``workdir/tokenizer.model``
       (a workdir holds everything of its run). A workdir already holding a *different*
       tokenizer is an error (resuming a run with another tokenizer would be silent
       nonsense).
    2. ``workdir/tokenizer.model`` exists (a resumed run): load it.
    3. Otherwise train one on the configured train source with ``data_cfg.vocab_size``
       and ``data_cfg.tokenizer_type`` and save it in the workdir.
    """
    workdir = pathlib.Path(workdir)
    in_workdir = workdir_tokenizer(workdir)
    configured = data_cfg.get("tokenizer") or ""
    if not configured and data_cfg.get("prepared"):  # The prepared examples' tokenizer.
        configured = str(workdir_tokenizer(data_cfg.prepared) or "")
    if configured:
        tok = load_tokenizer(configured)
        if in_workdir is not None:
            existing = load_tokenizer(in_workdir)
            if existing.fingerprint != tok.fingerprint:
                raise ValueError(
                    f"{in_workdir} (fingerprint {existing.fingerprint}) differs from the "
                    f"configured tokenizer {configured} (fingerprint "
                    f"{tok.fingerprint}); use a fresh workdir or the same tokenizer."
                )
        else:
            tok.save(workdir)
        logging.info("Using tokenizer %s (vocab_size=%d).", configured, tok.vocab_size)
        return tok
    if in_workdir is not None:
        tok = load_tokenizer(in_workdir)
        logging.info("Using the workdir's tokenizer %s (vocab_size=%d).", in_workdir, tok.vocab_size)
        return tok
    from bert_jax.data import sources  # Imported here: sources is heavier (tfds).

    docs = sources.load_documents(data_cfg, "train")
    logging.info(
        "No tokenizer configured or in %s: training one on the %r train source.",
        workdir, data_cfg.source,
    )
    # Trained aside then moved in, so an interrupted run never leaves half a tokenizer.
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(
            (s for doc in docs.documents for s in doc),
            tmp,
            vocab_size=data_cfg.vocab_size,
            model_type=data_cfg.tokenizer_type,
            max_sentences=ENSURE_MAX_SENTENCES,
        )
        for name in ("tokenizer.vocab", MODEL_FILENAME):  # The model last: it marks done.
            _atomic_write(workdir / name, (pathlib.Path(tmp) / name).read_bytes())
    return load_tokenizer(workdir / MODEL_FILENAME)


__all__ = [
    "CLS_ID", "FIRST_REGULAR_ID", "HFTokenizer", "MASK_ID", "MODEL_FILENAME", "PAD_ID",
    "SEP_ID", "UNK_ID",
    "SentencePieceTokenizer", "Tokenizer", "ensure_tokenizer", "load_tokenizer",
    "train_tokenizer", "workdir_tokenizer",
]
