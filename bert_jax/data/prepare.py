"""Offline preparation of pretraining examples into sharded ArrayRecord files (Apache Beam).

As BERT's ``create_pretraining_data.py``: the corpus is cut into *input shards* (a byte
range of a text file, a whole ``.gz`` file, a range of tfds records), and each input
shard, on its own, is read, tokenized and turned into the examples of the run's
``ExampleKind`` by the same builders as the in-memory pipeline
(:func:`bert_jax.data.corpus.tokenize_documents`, :func:`bert_jax.data.examples.plan_single`,
:func:`~bert_jax.data.examples.plan_pairs`, :func:`~bert_jax.data.examples.make_example`),
then written to one output shard (:mod:`bert_jax.data.arrayrecord`). A worker holds one
input shard at a time, so nothing holds the corpus. NSP's random next segments come from
the same input shard (BERT also draws them from the documents of one run's input files).

Resumable: each shard is written under a temporary name, renamed when complete, then its
manifest entry (``SHARD.json``) is written; a re-run skips every shard whose file and entry
exist, match and were made by the same job (``prepare.json``: config, source, tokenizer,
shard layout). ``manifest.json`` is written last, from the entries.

Deterministic: the input shards depend only on the files and the shard size, and shard
``i`` of a split is planned with seed ``split_seed + i * 2**32`` (the split seed as the
in-memory pipeline's, so a corpus of one input shard gives today's examples exactly).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import time
import uuid
from typing import Any


from bert_jax.data import arrayrecord
from bert_jax.data import bundled
from bert_jax.data import corpus as corpus_lib
from bert_jax.data import examples as examples_lib
from bert_jax.data import sources

JOB_FILE = "prepare.json"
DEFAULT_SHARD_BYTES = 32 << 20
DEFAULT_TFDS_DOCS_PER_SHARD = 20_000
_UNIT_SEED_STRIDE = 2**32
# As bert_jax.data.pipeline (the eval split's plan seed); train.py builds eval with seed+1.
_EVAL_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True)
class Kind:
    """The fields of an ``objectives.base.ExampleKind`` the builders read (no jax import
    in Beam workers)."""

    name: str
    segments: int = 1
    negative: str = ""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One input shard -> one output shard.

    ``source`` "text": ``path`` bytes ``[start, end)`` (``end=-1``: to the end; a document
    belongs to the range holding the blank line before it, the first one to range 0; in
    the "lines" format a line belongs to the range holding its first byte, as Hadoop's
    text splits). ``source`` "tfds": records ``[start, end)`` of ``tfds`` = (name, split,
    data_dir, text_key).
    """

    split: str
    index: int
    count: int
    source: str
    path: str = ""
    start: int = 0
    end: int = -1
    text_format: str = "sentences"
    tfds: tuple[str, str, str, str] = ("", "", "", "")

    @property
    def file(self) -> str:
        return arrayrecord.shard_name(self.split, self.index, self.count)

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tfds"] = list(self.tfds)
        return d


# ---------------------------------------------------------------------- input shards


def split_seed(seed: int, split: str) -> int:
    """The plan seed of a split, as ``train.pretraining`` + ``pipeline.build_examples``."""
    return seed if split == "train" else seed + 1 + _EVAL_SEED_OFFSET


def enumerate_units(data_cfg: Any, split: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
                    tfds_docs_per_shard: int = DEFAULT_TFDS_DOCS_PER_SHARD) -> list[Unit]:
    """The input shards of ``split``, in a deterministic order."""
    name = data_cfg.get("source")
    pieces: list[dict[str, Any]] = []
    if name == "bundled":
        path = bundled.corpus_path(sources._bundled_split(split))
        pieces.append(dict(source="text", path=str(path), text_format="sentences"))
    elif name == "text":
        fmt = sources._text_format(data_cfg)
        for path in sources._expand_globs(sources._text_globs(data_cfg, split)):
            size = path.stat().st_size
            if path.suffix == ".gz" or fmt == "plain" or size <= shard_bytes:
                pieces.append(dict(source="text", path=str(path), text_format=fmt))
                continue
            for start in range(0, size, shard_bytes):
                end = min(start + shard_bytes, size)
                pieces.append(dict(source="text", path=str(path), start=start,
                                   end=-1 if end == size else end, text_format=fmt))
    elif name == "tfds":
        ds = sources._open_tfds(data_cfg, split)
        n = len(ds)
        spec = (str(data_cfg.tfds_name), sources._tfds_split(data_cfg, split),
                str(data_cfg.get("tfds_data_dir") or ""), str(data_cfg.get("tfds_text_key") or "text"))
        for start in range(0, n, tfds_docs_per_shard):
            pieces.append(dict(source="tfds", start=start, end=min(n, start + tfds_docs_per_shard),
                               tfds=spec))
    else:
        raise ValueError(f"launch.prepare_data cannot read data.source={name!r} "
                         "(bundled, text, tfds).")
    return [Unit(split=split, index=i, count=len(pieces), **p) for i, p in enumerate(pieces)]


@dataclasses.dataclass
class _ReadStats:
    skipped_non_utf8: int = 0
    empty_documents_skipped: int = 0
    text_bytes: int = 0


def _read_text_range(path: str, start: int, end: int, fmt: str) -> tuple[list[list[str]], _ReadStats]:
    """The documents of one text unit, with :func:`bundled.read_documents`' line rules
    (non-UTF-8 lines dropped and counted, lines stripped, a BOM at the file start ignored)
    and :func:`sources._load_text`'s formats."""
    stats = _ReadStats()
    limit = float("inf") if end < 0 else end
    docs: list[list[str]] = []
    current: list[str] = []
    dropped_in_current = False
    sentences_format = fmt == "sentences"
    with bundled._open_binary(pathlib.Path(path)) as f:
        pos = 0
        if start > 0:
            f.seek(start)
            pos = start + len(f.readline())  # The line holding byte `start` is range r-1's.
        in_docs = start == 0 or not sentences_format
        for raw in iter(f.readline, b""):
            line_pos, pos = pos, pos + len(raw)
            if (not sentences_format or not in_docs) and line_pos > limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                if in_docs:
                    stats.skipped_non_utf8 += 1
                    stats.text_bytes += len(raw)
                    dropped_in_current = True
                continue
            if line_pos == 0:
                line = line.lstrip("\ufeff")
            line = line.strip()
            if not in_docs:  # Before this range's first document: find its separator.
                in_docs = not line
                continue
            stats.text_bytes += len(raw)
            if not sentences_format:
                if not line:
                    stats.empty_documents_skipped += 1  # A blank line (as _load_text).
                elif fmt == "lines":
                    s = sources.split_sentences(line)
                    if s:
                        docs.append(s)
                else:  # plain: the file is one document (one unit, never split).
                    current.append(line)
                continue
            if line:
                current.append(line)
                continue
            if current:
                docs.append(current)
                current, dropped_in_current = [], False
            else:
                stats.empty_documents_skipped += 1
                dropped_in_current = False
            if line_pos > limit:
                break
        else:  # End of file.
            if current:
                docs.append(current)
                current = []
            elif dropped_in_current and sentences_format:
                stats.empty_documents_skipped += 1
    if current:  # plain
        docs.append(current)
    elif fmt == "plain" and not docs:
        stats.empty_documents_skipped += 1
    return docs, stats


_TFDS_CACHE: dict[tuple, Any] = {}


def _read_tfds_range(spec: tuple[str, str, str, str], start: int, end: int
                     ) -> tuple[list[list[str]], _ReadStats]:
    """Records ``[start, end)`` of a tfds data source as documents (as sources._load_tfds)."""
    import ml_collections

    name, split, data_dir, key = spec
    if spec not in _TFDS_CACHE:
        cfg = ml_collections.ConfigDict(dict(tfds_name=name, tfds_data_dir=data_dir,
                                             train_split=split, eval_split=split))
        _TFDS_CACHE[spec] = sources._open_tfds(cfg, "train")
    ds = _TFDS_CACHE[spec]
    stats = _ReadStats()
    docs: list[list[str]] = []
    for i in range(start, end):
        record = ds[i]
        if key not in record:
            raise ValueError(f"tfds dataset {name!r} has no feature {key!r}; its records have "
                             f"{', '.join(sorted(record))}. Set data.tfds_text_key.")
        text = sources._as_text(record[key])
        if text is None:
            stats.skipped_non_utf8 += 1
            continue
        stats.text_bytes += len(text.encode("utf-8"))
        s = sources.split_sentences(text)
        if s:
            docs.append(s)
        else:
            stats.empty_documents_skipped += 1
    return docs, stats


def read_unit(unit: Unit) -> tuple[list[list[str]], _ReadStats]:
    if unit.source == "text":
        return _read_text_range(unit.path, unit.start, unit.end, unit.text_format)
    return _read_tfds_range(unit.tfds, unit.start, unit.end)


# ------------------------------------------------------------------------ one shard


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What every shard of a job shares (picklable)."""

    out_dir: str
    tokenizer_path: str
    kind: Kind
    seq_len: int
    packing: str
    short_seq_prob: float
    dupe_factor: int
    seed: int
    id_dtype: str
    job_key: str
    data_config: dict = dataclasses.field(default_factory=dict, compare=False)


def entry_path(out_dir: str | os.PathLike[str], file: str) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{file}.json"


def shard_done(out_dir: str | os.PathLike[str], unit: Unit, job_key: str) -> dict[str, Any] | None:
    """The shard's manifest entry if its file is complete and made by this job, else None."""
    final = pathlib.Path(out_dir) / unit.file
    entry = entry_path(out_dir, unit.file)
    if not final.is_file() or not entry.is_file():
        return None
    try:
        e = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    if e.get("job") != job_key or e.get("bytes") != final.stat().st_size or e.get("unit") != unit.describe():
        return None
    return e


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_shard(unit: Unit, spec: ShardSpec, tokenizer: Any) -> dict[str, Any]:
    """Reads, tokenizes, plans and writes one shard; returns its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    t0, cpu0 = time.perf_counter(), time.process_time()
    docs, read = read_unit(unit)
    corpus = corpus_lib.tokenize_documents(docs, tokenizer, progress=False)
    del docs
    seed = split_seed(spec.seed, unit.split) + unit.index * _UNIT_SEED_STRIDE
    note = ""
    plan: examples_lib.Plan | None = None
    if corpus.num_sentences == 0:
        note = "no tokens"
    elif spec.kind.segments == 1:
        plan = examples_lib.plan_single(corpus, spec.seq_len, spec.packing, seed)
    elif spec.kind.negative == "random_document" and corpus.num_documents < 2:
        note = f"{corpus.num_documents} document(s): no random next segment to draw"
    else:
        plan = examples_lib.plan_pairs(corpus, spec.seq_len, spec.kind,
                                       short_seq_prob=spec.short_seq_prob, seed=seed,
                                       dupe_factor=spec.dupe_factor)
    final = pathlib.Path(spec.out_dir) / unit.file
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    n = tokens = 0
    labels = 0
    writer = ArrayRecordWriter(str(tmp), arrayrecord.WRITER_OPTIONS)
    try:
        if plan is not None and len(plan):
            exs = examples_lib.Examples(corpus, plan, tokenizer)
            for i in range(len(plan)):
                ex = exs[i]
                writer.write(arrayrecord.encode(ex, spec.id_dtype))
                tokens += int(ex["attention_mask"].sum())
                labels += int(ex.get("sentence_label", 0))
            n = len(plan)
        writer.close()
        os.replace(tmp, final)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    plan_stats: dict[str, Any] = {}
    if isinstance(plan, examples_lib.SinglePlan):
        plan_stats = {"split_sentences": plan.split_sentences}
    elif isinstance(plan, examples_lib.PairPlan):
        plan_stats = {"label_1": labels, "forced_random": plan.forced_random,
                      "split_sentences": plan.split_sentences,
                      "dropped_chunks": plan.dropped_chunks}
    entry = {
        "file": unit.file, "examples": n, "bytes": final.stat().st_size, "tokens": tokens,
        "documents": corpus.num_documents, "sentences": corpus.num_sentences,
        "corpus_tokens": corpus.num_tokens, "text_bytes": read.text_bytes,
        "skipped_non_utf8": read.skipped_non_utf8,
        "empty_documents_skipped": read.empty_documents_skipped, "plan": plan_stats,
        "note": note, "seconds": round(time.perf_counter() - t0, 3),
        "cpu_seconds": round(time.process_time() - cpu0, 3), "unit": unit.describe(),
        "job": spec.job_key,
    }
    _atomic_write_text(entry_path(spec.out_dir, unit.file), json.dumps(entry, indent=1))
    return entry


def _shard_dofn():
    import apache_beam as beam

    class BuildShard(beam.DoFn):
        def __init__(self, spec: ShardSpec):
            self._spec = spec
            self._tok = None

        def setup(self):
            from bert_jax.data import tokenizer as tokenizer_lib
            self._tok = tokenizer_lib.load_tokenizer(self._spec.tokenizer_path)

        def process(self, unit: Unit):
            entry = build_shard(unit, self._spec, self._tok)
            yield {k: entry[k] for k in ("file", "examples", "text_bytes")}

    return BuildShard


# ---------------------------------------------------------------------------- a job


def pipeline_options(runner: str = "DirectRunner", num_workers: int = 2,
                     running_mode: str = "multi_processing", extra: list[str] | None = None):
    """Beam options: the DirectRunner with ``num_workers`` local workers by default; any
    other runner's flags (Dataflow, Flink, Spark) in ``extra``."""
    from apache_beam.options.pipeline_options import PipelineOptions

    args = [f"--runner={runner}"]
    if runner == "DirectRunner":
        args += [f"--direct_num_workers={num_workers}", f"--direct_running_mode={running_mode}"]
    return PipelineOptions(args + list(extra or []))


def _job(config: Any, tok: Any, kind: Kind, splits: list[str], shard_bytes: int,
         tfds_docs_per_shard: int) -> dict[str, Any]:
    data = config.data
    return {
        "format": arrayrecord.FORMAT, "layout": arrayrecord.LAYOUT,
        "tokenizer": tok.fingerprint, "example_kind": arrayrecord.kind_dict(kind),
        "examples": arrayrecord.example_fields(data, kind), "seed": int(config.seed),
        "source": {s: sources.source_fingerprint(data, s) for s in splits},
        "shard_bytes": shard_bytes, "tfds_docs_per_shard": tfds_docs_per_shard,
    }


def _job_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {json.dumps(old.get(k), default=str)[:200]} -> "
            f"{json.dumps(new.get(k), default=str)[:200]}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def prepare(config: Any, out: str | os.PathLike[str], *, splits: tuple[str, ...] = ("train", "eval"),
            shard_bytes: int = DEFAULT_SHARD_BYTES,
            tfds_docs_per_shard: int = DEFAULT_TFDS_DOCS_PER_SHARD,
            options: Any = None, log=print) -> dict[str, Any]:
    """Prepares the examples ``config`` asks for into ``out``; returns the manifest.

    The tokenizer: ``config.data.tokenizer``, else ``out``'s (a resumed job), else one
    trained on the train source (``tokenizer.ensure_tokenizer`` with ``out`` as workdir:
    that reads the whole train source; for a big corpus train it first with
    ``launch.train_tokenizer --max_sentences`` and pass ``--config.data.tokenizer``).

    Raises:
      ValueError: a pair kind on a source without document boundaries, ``out`` holding
        another job's preparation, or a source that cannot be read.
    """
    import apache_beam as beam
    import objectives
    from bert_jax import train
    from bert_jax.data import tokenizer as tokenizer_lib

    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = config.data
    tok = tokenizer_lib.ensure_tokenizer(data, out_dir)
    tok_file = tokenizer_lib.workdir_tokenizer(out_dir)
    ek = objectives.build(config, train.special_ids(tok)).example_kind
    if ek.planner is not None or ek.features:
        # The record layout holds ids, words and one label: not a planner's segments or
        # an objective's host-side fields (they would be silently missing in training).
        what = [f"the {ek.name!r} planner"] if ek.planner is not None else []
        what += [f"the field {f.name!r}" for f in ek.features]
        raise ValueError(f"objectives {config.objectives!r} need {', '.join(what)}, which "
                         "prepared shards do not hold yet; train them from the in-memory "
                         "sources (data.source=bundled, text or tfds, no data.prepared), or "
                         "turn off the option that asks for them (e.g. mlm.pmi=False, "
                         "mlm.smoothing=0 for the distilbert preset)")
    kind = Kind(ek.name, ek.segments, ek.negative)
    if kind.segments == 2 and data.get("source") == "text" and sources._text_format(data) == "plain":
        raise ValueError(f"{kind.name.upper()} needs documents, but text_format='plain' has no "
                         "document boundaries. Use text_format='sentences' or 'lines'.")
    job = _job(config, tok, kind, list(splits), shard_bytes, tfds_docs_per_shard)
    job_key = arrayrecord.fingerprint(job)
    job_path = out_dir / JOB_FILE
    if job_path.is_file():
        old = json.loads(job_path.read_text())
        if old.get("key") != job_key:
            raise ValueError(
                f"{out_dir} holds a preparation of another job; differences: "
                + "; ".join(_job_differences(old.get("job", {}), job))
                + ". Use another --out, or delete it.")
    else:
        _atomic_write_text(job_path, json.dumps({"key": job_key, "job": job}, indent=1, default=str))
    for leftover in glob.glob(str(out_dir / "*.tmp-*")):  # A killed job's partial files.
        os.unlink(leftover)
    spec = ShardSpec(out_dir=str(out_dir), tokenizer_path=str(tok_file), kind=kind,
                     seq_len=int(data.seq_len), packing=data.get("packing") or "full_sentences",
                     short_seq_prob=float(data.get("short_seq_prob", 0.1)),
                     dupe_factor=int(data.get("dupe_factor", 1) or 1), seed=int(config.seed),
                     id_dtype=arrayrecord.id_dtype_for(tok.vocab_size), job_key=job_key,
                     data_config=json.loads(json.dumps(data.to_dict(), default=str)))
    units = {s: enumerate_units(data, s, shard_bytes=shard_bytes,
                                tfds_docs_per_shard=tfds_docs_per_shard) for s in splits}
    pending = [u for s in splits for u in units[s] if shard_done(out_dir, u, job_key) is None]
    total = sum(len(v) for v in units.values())
    log(f"prepare: {total} shards ({', '.join(f'{s} {len(units[s])}' for s in splits)}), "
        f"{total - len(pending)} already done, {len(pending)} to build; {kind.name} examples "
        f"of {spec.seq_len} tokens")
    t0 = time.perf_counter()
    if pending:
        options = options if options is not None else pipeline_options()
        with beam.Pipeline(options=options) as p:
            _ = (p | "units" >> beam.Create(pending) | "spread" >> beam.Reshuffle()
                 | "build" >> beam.ParDo(_shard_dofn()(spec)))
    seconds = time.perf_counter() - t0
    manifest = _manifest(out_dir, units, job, job_key, tok, tok_file, spec)
    manifest["prepare_seconds_last_run"] = round(seconds, 2)
    _atomic_write_text(out_dir / arrayrecord.MANIFEST, json.dumps(manifest, indent=1, default=str))
    return manifest


def _manifest(out_dir: pathlib.Path, units: dict[str, list[Unit]], job: dict[str, Any],
              job_key: str, tok: Any, tok_file: pathlib.Path, spec: ShardSpec) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split, us in units.items():
        entries = []
        for u in us:
            e = shard_done(out_dir, u, job_key)
            if e is None:
                raise RuntimeError(f"Shard {u.file} is not complete after the pipeline ran.")
            entries.append({k: v for k, v in e.items() if k not in ("job",)})
        splits_cpu = sum(e.get("cpu_seconds", 0.0) for e in entries)
        keys = ("examples", "tokens", "documents", "sentences", "corpus_tokens", "text_bytes",
                "skipped_non_utf8", "empty_documents_skipped")
        splits[split] = {k: int(sum(e[k] for e in entries)) for k in keys}
        splits[split]["cpu_seconds"] = round(splits_cpu, 2)
        splits[split]["shards"] = entries
        if spec.kind.segments == 2 and splits[split]["examples"]:
            splits[split]["label_1_fraction"] = round(
                sum(e["plan"].get("label_1", 0) for e in entries) / splits[split]["examples"], 4)
    return {
        "format": arrayrecord.FORMAT,
        "job": job_key,
        "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": int(tok.vocab_size),
                      "file": tok_file.name},
        "example_kind": job["example_kind"],
        "examples": job["examples"],
        "seed": job["seed"],
        "data": _data_dict(job),
        "data_config": spec.data_config,
        "record": {"layout": arrayrecord.LAYOUT, "id_dtype": spec.id_dtype,
                   "writer_options": arrayrecord.WRITER_OPTIONS},
        "splits": splits,
    }


def _data_dict(job: dict[str, Any]) -> dict[str, Any]:
    return {"source": job["source"], "shard_bytes": job["shard_bytes"],
            "tfds_docs_per_shard": job["tfds_docs_per_shard"]}


__all__ = ["Kind", "ShardSpec", "Unit", "build_shard", "enumerate_units", "pipeline_options",
           "prepare", "read_unit", "shard_done", "split_seed"]
