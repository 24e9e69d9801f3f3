"""Prepared examples in sharded ArrayRecord files: the record layout, the manifest and the
grain reader.

``launch/prepare_data.py`` (:mod:`bert_jax.data.prepare`) writes, in one directory::

    manifest.json                         what was prepared, and how (see below)
    tokenizer.model                       the tokenizer the ids come from
    train-00000-of-00012.arrayrecord ...  one serialized example per record
    eval-00000-of-00001.arrayrecord

Training reads it with ``--config.data.prepared=DIR``: :func:`build_dataset` opens the
shards with ``grain.sources.ArrayRecordDataSource`` (random access over every shard of a
split, nothing loaded up front) and decodes an example when grain asks for its index, so
the pipeline's global shuffle, per-host slicing and checkpointed iterator state
(:func:`bert_jax.data.pipeline.train_iterator`) work unchanged, whatever the corpus size.

Record layout ``ids_words_v1`` (little-endian), for an example of ``n <= seq_len`` real
tokens (specials included):

- int32 ``[3]``: ``n``, ``sep`` (the position of the first [SEP] for pairs: segment 1 is
  ``sep + 1 .. n - 1``; ``n`` for single segments), ``sentence_label`` (-1 for single
  segments);
- ids ``[n]`` as ``manifest["record"]["id_dtype"]`` (uint16 when the vocabulary fits, else
  int32);
- int16 ``[n]`` word ids (-1 for specials).

That is 4 bytes a token (uint16 ids): the 100x bundled corpus (~120M tokens) in ~0.5 GB.
:func:`decode` rebuilds exactly the dict :func:`bert_jax.data.examples.make_example` gives
(``input_ids``, ``segment_ids``, ``attention_mask``, ``word_ids``, ``sentence_label``),
with ``example_id`` = the record's global index in the split (shards in manifest order).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
from typing import Any

import grain
import numpy as np

FORMAT = "bert_jax.prepared/1"
LAYOUT = "ids_words_v1"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SHARD_SUFFIX = ".arrayrecord"
# Random access reads one record per chunk: one record per group, no compression.
WRITER_OPTIONS = "group_size:1,uncompressed"

_HEADER_BYTES = 12


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def id_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


# ----------------------------------------------------------------------------- codec


def encode(example: dict[str, np.ndarray], id_dtype: str) -> bytes:
    """One example of :func:`~bert_jax.data.examples.make_example` as record bytes."""
    n = int(np.asarray(example["attention_mask"]).sum())
    ones = np.flatnonzero(np.asarray(example["segment_ids"])[:n])
    sep = int(ones[0]) - 1 if len(ones) else n
    label = int(example["sentence_label"]) if "sentence_label" in example else -1
    ids = np.asarray(example["input_ids"])[:n].astype(np.dtype(id_dtype).newbyteorder("<"))
    words = np.asarray(example["word_ids"])[:n].astype("<i2")
    return struct.pack("<iii", n, sep, label) + ids.tobytes() + words.tobytes()


class Decoder:
    """Record bytes -> the example dict; a handful of numpy calls per example (the
    masks come from precomputed tables). Picklable."""

    def __init__(self, seq_len: int, id_dtype: str, pad_id: int, pairs: bool):
        self.seq_len, self.id_dtype, self.pad_id, self.pairs = seq_len, id_dtype, pad_id, pairs
        self._setup()

    def _setup(self):
        L = self.seq_len
        self._ids_dtype = np.dtype(self.id_dtype).newbyteorder("<")
        self._width = self._ids_dtype.itemsize
        # _prefix[k] = 1 on positions < k: attention masks and (differences) segment ids.
        self._prefix = (np.arange(L)[None, :] < np.arange(L + 2)[:, None]).astype(np.int32)
        self._prefix.flags.writeable = False  # Masks are views of it: never written.

    def __getstate__(self):
        return (self.seq_len, self.id_dtype, self.pad_id, self.pairs)

    def __setstate__(self, state):
        self.seq_len, self.id_dtype, self.pad_id, self.pairs = state
        self._setup()

    def __call__(self, index: int, record: bytes) -> dict[str, np.ndarray]:
        """grain's ``map_with_index`` order: (global index, record); a batch of one."""
        return {k: v[0, ...] for k, v in self.batch(np.asarray([index]), [record]).items()}

    def batch(self, indices: np.ndarray, records: list[bytes]) -> dict[str, np.ndarray]:
        """Many records at once: the same arrays as ``__call__`` for each, stacked."""
        b, L = len(records), self.seq_len
        head = np.frombuffer(b"".join(r[:_HEADER_BYTES] for r in records), "<i4").reshape(b, 3)
        n, sep = head[:, 0], head[:, 1]
        input_ids = np.full([b, L], self.pad_id, np.int32)
        word_ids = np.full([b, L], -1, np.int32)
        w = self._width
        for i, (k, record) in enumerate(zip(n.tolist(), records)):
            input_ids[i, :k] = np.frombuffer(record, self._ids_dtype, k, _HEADER_BYTES)
            word_ids[i, :k] = np.frombuffer(record, "<i2", k, _HEADER_BYTES + w * k)
        mask = self._prefix[n]
        out = {
            "input_ids": input_ids,
            "segment_ids": mask - self._prefix[np.minimum(sep + 1, n)],
            "attention_mask": mask,
            "word_ids": word_ids,
        }
        if self.pairs:
            out["sentence_label"] = head[:, 2].astype(np.int32)
        out["example_id"] = np.asarray(indices, dtype=np.int32)
        return out


# -------------------------------------------------------------------------- manifest


def fingerprint(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def example_fields(data_cfg: Any, kind: Any) -> dict[str, Any]:
    """The data-config fields that decide what the examples are (beside the tokenizer and
    the source): a prepared directory and a run must agree on them."""
    fields: dict[str, Any] = {"seq_len": int(data_cfg.seq_len)}
    if kind.segments == 1:
        fields["packing"] = data_cfg.get("packing") or "full_sentences"
    else:
        fields["short_seq_prob"] = float(data_cfg.get("short_seq_prob", 0.1))
        fields["dupe_factor"] = int(data_cfg.get("dupe_factor", 1) or 1)
    return fields


def kind_dict(kind: Any) -> dict[str, Any]:
    return {"name": kind.name, "segments": int(kind.segments), "negative": kind.negative}


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{directory} holds no {MANIFEST}: not a prepared data directory, or its "
            "preparation did not finish (run `python -m launch.prepare_data` again with the "
            "same flags: it resumes).")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
    return manifest


def check_manifest(manifest: dict[str, Any], data_cfg: Any, kind: Any, tokenizer: Any,
                   where: str = "") -> None:
    """Refuses a prepared directory that does not match the run, naming each difference.

    Compared: the tokenizer (fingerprint), the example kind, and the fields of
    :func:`example_fields` (seq_len; packing for single segments; short_seq_prob and
    dupe_factor for pairs). The source fields of the run's config are not: the prepared
    directory replaces the source.
    """
    diffs = []
    if manifest["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        diffs.append(f"tokenizer fingerprint {manifest['tokenizer']['fingerprint']} (prepared) "
                     f"!= {tokenizer.fingerprint} (this run)")
    want_kind = kind_dict(kind)
    if manifest["example_kind"] != want_kind:
        diffs.append(f"example kind {manifest['example_kind']['name']!r} (prepared) != "
                     f"{want_kind['name']!r} (this run's objectives)")
    else:
        want = example_fields(data_cfg, kind)
        have = manifest["examples"]
        for k, v in want.items():
            if have.get(k) != v:
                diffs.append(f"data.{k}={have.get(k)!r} (prepared) != {v!r} (this run)")
    if diffs:
        raise ValueError(
            f"The prepared data in {where or 'data.prepared'} does not match this run: "
            + "; ".join(diffs) + ". Prepare it again with this config "
            "(python -m launch.prepare_data) or change the run's config.")


def shard_paths(directory: str | os.PathLike[str], manifest: dict[str, Any], split: str) -> list[str]:
    """The split's non-empty shard files, in manifest order; each checked to exist with
    the size the manifest says."""
    if split not in manifest["splits"]:
        raise ValueError(f"The prepared data in {directory} has no {split!r} split "
                         f"(it has {', '.join(sorted(manifest['splits']))}).")
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        if not shard["examples"]:
            continue
        p = pathlib.Path(directory) / shard["file"]
        if not p.is_file() or p.stat().st_size != shard["bytes"]:
            raise ValueError(f"Prepared shard {p} is missing or has another size than its "
                             f"manifest entry ({shard['bytes']} bytes); prepare it again.")
        paths.append(str(p))
    return paths


# ---------------------------------------------------------------------------- reader


def build_dataset(data_cfg: Any, tokenizer: Any, split: str, *, example_kind: Any,
                  global_batch_size: int | None = None):
    """The prepared examples of ``split`` as a grain ``MapDataset`` (random access over
    the shards; unshuffled: :func:`~bert_jax.data.pipeline.train_iterator` shuffles).

    Raises:
      ValueError: no manifest, a manifest that does not match the run
        (:func:`check_manifest`), a missing shard, or fewer examples than one batch.
    """
    from absl import logging

    directory = str(data_cfg.prepared)
    manifest = read_manifest(directory)
    check_manifest(manifest, data_cfg, example_kind, tokenizer, where=directory)
    paths = shard_paths(directory, manifest, split)
    info = manifest["splits"][split]
    if not paths:
        raise ValueError(f"The prepared {split} split in {directory} has no example.")
    source = grain.sources.ArrayRecordDataSource(paths)
    if len(source) != info["examples"]:
        raise ValueError(f"The prepared {split} shards in {directory} hold {len(source)} "
                         f"records, the manifest says {info['examples']}.")
    if global_batch_size is not None and len(source) < global_batch_size:
        raise ValueError(
            f"The prepared {split} split in {directory} has {len(source)} examples, fewer "
            f"than one global batch of {global_batch_size}: use a bigger corpus or a "
            "smaller batch size.")
    decoder = Decoder(seq_len=int(manifest["examples"]["seq_len"]),
                      id_dtype=manifest["record"]["id_dtype"], pad_id=int(tokenizer.pad_id),
                      pairs=example_kind.segments == 2)
    logging.info("[%s] prepared %s: %d shards, %s %s examples of length %d, %s tokens.",
                 split, directory, len(paths), f"{info['examples']:,}",
                 manifest["example_kind"]["name"], decoder.seq_len, f"{info['tokens']:,}")
    return PreparedDataset(source, decoder)


class PreparedDataset(grain.MapDataset):
    """The decoded examples of a split's shards (random access), with ``read_batch`` for
    the training iterator: one batched ArrayRecord read and one decode for a whole batch
    instead of one per example."""

    def __init__(self, source: Any, decoder: Decoder):
        super().__init__()
        self._source, self._decoder = source, decoder

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._decoder(index, self._source[index % len(self._source)])

    def __str__(self) -> str:
        return f"PreparedDataset({len(self._source)} records)"

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = self._source.__getitems__([int(i) for i in indices])
        return self._decoder.batch(indices, records)


__all__ = ["Decoder", "PreparedDataset", "build_dataset", "check_manifest", "decode", "encode", "read_manifest",
           "shard_name", "shard_paths"]


def decode(record: bytes, index: int, *, seq_len: int, id_dtype: str, pad_id: int,
           pairs: bool) -> dict[str, np.ndarray]:
    """:class:`Decoder` as a function."""
    return Decoder(seq_len, id_dtype, pad_id, pairs)(index, record)
