"""The grain input pipeline: examples as a random-access dataset, training iterators and
evaluation batches.

::

    tok = tokenizer.ensure_tokenizer(config.data, workdir)
    kind = objectives.example_kind(setup.objectives)  # e.g. NSP's pairs
    ds = build_dataset(config.data, tok, "train", seed=config.seed, example_kind=kind,
                       workdir=workdir)
    it = train_iterator(ds, batch_size_per_host=..., seed=config.seed,
                        process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)            # dict of numpy arrays [batch_size_per_host, ...]
    state = it.get_state()      # saved with the checkpoint; it.set_state(state) resumes

The global order of examples is one shuffled stream (reshuffled every epoch) cut into
global batches; host ``p`` of ``P`` takes elements ``p, p + P, p + 2P, ...`` of it, so a
global batch is the same set of examples whatever the number of hosts.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import logging

from bert_jax.data import corpus as corpus_lib
from bert_jax.data import examples as examples_lib
from bert_jax.data.tokenizer import Tokenizer
from objectives.base import SINGLE, ExampleKind

# Seed offset of the eval split's pair plan, so eval pairs don't mirror the train ones.
_EVAL_SEED_OFFSET = 1_000_003
_DEFAULT_PREFETCH_THREADS = 8


def cache_dir_for(data_cfg: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> pathlib.Path:
    """``data_cfg.cache_dir``, or ``workdir/data_cache`` when it is empty."""
    configured = data_cfg.get("cache_dir") or ""
    return pathlib.Path(configured) if configured else pathlib.Path(workdir) / "data_cache"


def build_examples(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    example_kind: ExampleKind = SINGLE,
    workdir: str | os.PathLike[str],
) -> examples_lib.Examples:
    """The examples of ``split`` as a random-access sequence with stats.

    Loads (or tokenizes and caches) the corpus, then plans single examples
    (``data_cfg.packing``) or pairs (``data_cfg.short_seq_prob``,
    ``data_cfg.dupe_factor``) of length ``data_cfg.seq_len``, as the objectives'
    ``ExampleKind`` says (its ``segments`` and ``negative``).

    Raises:
      ValueError: a bad pair kind, a pair kind on a source without document boundaries,
        or a corpus that yields no example.
    """
    corpus, source_stats = corpus_lib.load_corpus(
        data_cfg, split, tokenizer, cache_dir_for(data_cfg, workdir)
    )
    seq_len = int(data_cfg.seq_len)
    plan_seed = seed + (_EVAL_SEED_OFFSET if split == "eval" else 0)
    if example_kind.segments == 1:
        packing = data_cfg.get("packing") or "full_sentences"
        if packing == "doc_sentences" and not source_stats.has_document_boundaries:
            logging.warning(
                "packing='doc_sentences' on %s, which has no document boundaries.",
                source_stats.description,
            )
        plan: examples_lib.Plan = examples_lib.plan_single(corpus, seq_len, packing, plan_seed)
    else:
        if not source_stats.has_document_boundaries:
            raise ValueError(
                f"{example_kind.name.upper()} needs documents, but {source_stats.description} has "
                "no document boundaries (text_format='plain'). Use text_format='sentences' "
                "or 'lines', or an objective on single segments."
            )
        # A kind's own planner (StructBERT's, ERNIE's segments) or the sentence pairs.
        planner = examples_lib.plan_segments if example_kind.planner is not None else (
            examples_lib.plan_pairs)
        plan = planner(
            corpus,
            seq_len,
            example_kind,
            short_seq_prob=float(data_cfg.get("short_seq_prob", 0.1)),
            seed=plan_seed,
            dupe_factor=int(data_cfg.get("dupe_factor", 1) or 1),
        )
    stats: dict[str, Any] = {
        "split": split,
        "source": source_stats.description,
        "documents": corpus.num_documents,
        "sentences": corpus.num_sentences,
        "tokens": corpus.num_tokens,
        "examples": len(plan),
        "skipped_non_utf8": source_stats.skipped_non_utf8,
        "empty_documents_skipped": source_stats.empty_documents_skipped,
        "example_kind": example_kind.name,
        "seq_len": seq_len,
    }
    if isinstance(plan, examples_lib.SinglePlan):
        stats["split_sentences"] = plan.split_sentences
        stats["packing"] = plan.packing
    elif isinstance(plan, examples_lib.SegmentsPlan):
        counts = np.bincount(plan.labels) / max(1, len(plan))
        stats["label_fractions"] = ",".join(f"{x:.3f}" for x in counts)
    else:
        stats["label_1_fraction"] = round(float(plan.labels.mean()), 4) if len(plan) else 0.0
        stats["forced_random"] = plan.forced_random
        stats["split_sentences"] = plan.split_sentences
        stats["dropped_chunks"] = plan.dropped_chunks
    if len(plan) == 0:
        raise ValueError(f"The {split} corpus ({source_stats.description}) yields no example.")
    if source_stats.skipped_non_utf8:  # every launch, from the cache too
        logging.warning(
            "[%s] %s lines of %s were skipped: not valid UTF-8 (the training data lacks them).",
            split, f"{source_stats.skipped_non_utf8:,}", source_stats.description)
    if example_kind.features:
        stats["features"] = ",".join(f.name for f in example_kind.features)
    train_corpus = None
    if example_kind.features and split != "train":  # statistics come from the train split
        def train_corpus():
            return corpus_lib.load_corpus(data_cfg, "train", tokenizer,
                                          cache_dir_for(data_cfg, workdir))[0]
    result = examples_lib.Examples(corpus, plan, tokenizer, stats,
                                   features=example_kind.features, train_corpus=train_corpus)
    for line in describe(result):
        logging.info("%s", line)
    return result


def describe(examples: examples_lib.Examples) -> list[str]:
    """Human-readable lines about a dataset: source, counts of documents, sentences,
    tokens, examples, skipped lines, and the plan's particulars."""
    s = examples.stats
    lines = [
        f"[{s.get('split')}] {s.get('source')}: {s.get('documents')} documents, "
        f"{s.get('sentences')} sentences, {s.get('tokens')} tokens.",
        f"[{s.get('split')}] {s.get('examples')} {s.get('example_kind')} examples of "
        f"length {s.get('seq_len')}; skipped {s.get('skipped_non_utf8')} non-UTF-8 lines "
        f"and {s.get('empty_documents_skipped')} empty documents.",
    ]
    extra = {k: v for k, v in s.items() if k in (
        "packing", "split_sentences", "label_1_fraction", "forced_random", "dropped_chunks",
        "label_fractions", "features")}
    if extra:
        lines.append(f"[{s.get('split')}] " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    return lines


def build_dataset(
    data_cfg: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    split: str,
    *,
    seed: int,
    example_kind: ExampleKind = SINGLE,
    workdir: str | os.PathLike[str],
    global_batch_size: int | None = None,
) -> grain.MapDataset:
    """The examples of ``split`` as a grain ``MapDataset`` (random access, unshuffled).

    Args:
      data_cfg: the data config.
      tokenizer: the run's tokenizer.
      split: "train" or "eval".
      seed: seed of the example plan (pairs); the same seed gives the same examples.
        With ``data_cfg.prepared`` (a directory of ``launch/prepare_data.py``) the
        examples are read from its shards instead (the seed is the preparation's).
      example_kind: the examples the objectives need (``objectives.example_kind``).
      workdir: the run's workdir (the corpus cache lives in it unless
        ``data_cfg.cache_dir`` is set).
      global_batch_size: if given, fail early when there are fewer examples than that.

    Raises:
      ValueError: see :func:`build_examples`; also fewer examples than
        ``global_batch_size``.
    """
    if data_cfg.get("prepared"):  # Sharded ArrayRecord files of launch/prepare_data.py.
        from bert_jax.data import arrayrecord

        return arrayrecord.build_dataset(data_cfg, tokenizer, split, example_kind=example_kind,
                                         global_batch_size=global_batch_size)
    examples = build_examples(
        data_cfg, tokenizer, split, seed=seed, example_kind=example_kind, workdir=workdir
    )
    if global_batch_size is not None:
        _check_enough(len(examples), global_batch_size, examples.stats.get("source", split))
    return grain.MapDataset.source(examples)


def _check_enough(num_examples: int, global_batch: int, what: str) -> None:
    if num_examples < global_batch:
        raise ValueError(
            f"{what} has {num_examples} examples, fewer than one global batch of "
            f"{global_batch}: use a bigger corpus or a smaller batch size."
        )


class _WithEpoch(grain.transforms.MapWithIndex):
    """(example index, epoch) for a position of the repeated stream: epoch = position //
    epoch length."""

    def __init__(self, epoch_length: int):
        self._n = epoch_length

    def map_with_index(self, position: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        return np.int64(index), np.int32(position // self._n)


class _ReadBatch(grain.transforms.Map):
    """A batch of (indices, epochs) -> the batch of examples, with their ``epoch`` field:
    ``ds.read_batch(indices)`` where the dataset has it, else its examples stacked."""

    def __init__(self, ds: grain.MapDataset):
        self._ds = ds
        self._read = getattr(ds, "read_batch", None) or self._stack

    def _stack(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self._ds[int(i)] for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def map(self, element: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        indices, epochs = element
        batch = self._read(indices)
        batch["epoch"] = np.asarray(epochs, np.int32)
        return batch


def train_iterator(
    ds: grain.MapDataset,
    *,
    batch_size_per_host: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 0,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of training batches for this host.

    The dataset is shuffled with ``seed`` (a new permutation every epoch) and repeated;
    each element gets an int32 ``epoch`` field; host ``process_index`` takes every
    ``process_count``-th element of that stream; elements are batched
    (``drop_remainder``). Deterministic: the batches depend only on the dataset, the seed
    and the global batch size (``batch_size_per_host * process_count``), not on threads.

    Args:
      ds: the dataset from :func:`build_dataset`.
      batch_size_per_host: examples per batch on this host.
      seed: shuffle seed (in ``[0, 2**32)``).
      process_index: this host's index.
      process_count: number of hosts.
      num_threads: prefetch threads (``data_cfg.num_threads``); 0 picks a default.

    Returns:
      A ``grain.DatasetIterator``; ``get_state()`` / ``set_state()`` save and restore the
      position exactly.

    Raises:
      ValueError: if ``ds`` has fewer examples than one global batch, or bad arguments.
    """
    if batch_size_per_host < 1:
        raise ValueError(f"batch_size_per_host must be >= 1, got {batch_size_per_host}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    n = len(ds)
    _check_enough(n, batch_size_per_host * process_count, "The training dataset")
    # The shuffle, the epochs and the host's share are planned on indices; each batch is
    # then read at once (`read_batch`: one batched read and decode for prepared shards),
    # so the per-element work of grain is on integers only.
    stream = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat()
    host = stream.map_with_index(_WithEpoch(n))[process_index::process_count]
    batched = host.batch(batch_size_per_host, drop_remainder=True).map(_ReadBatch(ds))
    threads = num_threads if num_threads > 0 else min(_DEFAULT_PREFETCH_THREADS, os.cpu_count() or 1)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads))
    return iter(batched.to_iter_dataset(read_options))


def eval_batches(
    ds: grain.MapDataset,
    *,
    batch_size: int,
    num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` batches of the unshuffled dataset (this host's part).

    Global batch ``k`` holds examples ``[k * B * P, (k + 1) * B * P)``
    (``B = batch_size``, ``P = process_count``); this host gets every ``P``-th of them.
    Incomplete batches are dropped; asking for more batches than exist gives all there
    are, with a warning.

    Args:
      ds: the dataset from :func:`build_dataset`.
      batch_size: examples per batch on this host.
      num_batches: batches wanted; None for all full batches.
      process_index: this host's index.
      process_count: number of hosts.

    Raises:
      ValueError: if not even one full batch exists.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    global_batch = batch_size * process_count
    available = len(ds) // global_batch
    if available == 0:
        raise ValueError(
            f"The eval dataset has {len(ds)} examples, fewer than one batch of "
            f"{global_batch}: use a bigger eval corpus or a smaller eval batch size."
        )
    if num_batches is None:
        num_batches = available
    elif num_batches > available:
        logging.warning(
            "Asked for %d eval batches of %d but the eval dataset has only %d; using %d.",
            num_batches, global_batch, available, available,
        )
        num_batches = available
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
    host = ds[: num_batches * global_batch][process_index::process_count]
    batched = host.batch(batch_size, drop_remainder=True)
    return [batched[i] for i in range(num_batches)]


__all__ = [
    "build_dataset", "build_examples", "cache_dir_for", "describe", "eval_batches",
    "train_iterator",
]
