"""Labelled examples for fine-tuning: the bundled task, local CSV/TSV/JSONL files, tfds.

A reader turns `config.task` and a split ("train" or "dev") into plain records of one
shape per task kind:

  classification / regression  {"text", "text_pair" (or None), "label"}
  tagging                      {"tokens": [str], "tags": [int]}
  qa                           {"id", "question", "context", "answers": [{"text", "start"}]}
                               (an empty answer list: unanswerable, SQuAD v2)
  multiple_choice              {"context", "choices": [str], "label"}

Labels given as strings are mapped through `task.label_names` (comma-separated), else
through the sorted labels of the train split; tfds ClassLabel features give their names.
Records a reader cannot use (a missing label such as GLUE's -1 on test splits, a label
outside the label set, the wrong number of choices) are skipped and counted; a split
with no usable record is an error that says why. `input_record` makes the same shapes
without labels from rows of new data (prediction), where a row it cannot use is an error
naming its line (`numbered_rows`).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import gzip
import io
import json
import os
import sys
from typing import Any, Iterable, Iterator

import ml_collections
import numpy as np
from absl import logging

from bert_jax.data import bundled

SOURCES = ("bundled", "files", "tfds")
UNKNOWN_LABEL = "label not in the label set"
SPLITS = ("train", "dev")


@dataclasses.dataclass
class TaskData:
  """The records of one split and what was learnt reading them."""

  records: list[dict[str, Any]]
  label_names: list[str] | None  # classification and tagging
  skipped: dict[str, int]  # reason -> count
  description: str


# ----------------------------------------------------------------------------- raw rows


def expand_globs(globs: str) -> list[str]:
  files: list[str] = []
  for pattern in (g.strip() for g in (globs or "").split(",")):
    if not pattern:
      continue
    matched = sorted(m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                     if os.path.isfile(m))
    if not matched:
      raise ValueError(f"No file matches {pattern!r}.")
    files.extend(matched)
  return files


def _open_text(path: str) -> io.TextIOBase:
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
  return open(path, encoding="utf-8", newline="")


def numbered_rows(path: str, *, strict: bool = False
                  ) -> Iterator[tuple[int, str, dict[str, Any]]]:
  """(number, where, row) for each row of a .csv / .tsv (header line) or .jsonl / .json
  (JSON lines or one list) file, optionally gzipped: `number` is the row's line in the
  file (where a quoted CSV field spans lines, the last; a JSON list's item number),
  `where` the "PATH:LINE" (or "PATH item N") that messages name.

  strict: a CSV/TSV row whose number of columns is not the header's, or a JSON line that
  is not an object, is an error naming its line (prediction refuses what training reads as
  it comes: DictReader's None for a missing column)."""
  base = path[:-3] if path.endswith(".gz") else path
  ext = os.path.splitext(base)[1].lower()
  with _open_text(path) as f:
    if ext in (".csv", ".tsv"):
      reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
      try:
        for row in reader:
          where = f"{path}:{reader.line_num}"
          if strict and (None in row or None in row.values()):
            width = len(reader.fieldnames) + len(row.get(None) or ()) - sum(
                v is None for k, v in row.items() if k is not None)
            raise ValueError(f"{where}: {width} column{'' if width == 1 else 's'} where the "
                             f"header ({path}:1) has {len(reader.fieldnames)} "
                             f"({', '.join(reader.fieldnames)})")
          yield reader.line_num, where, row
      except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not a valid "
                         f"{ext[1:].upper()} row ({e})") from None
    elif ext in (".jsonl", ".json"):
      text = f.read()
      stripped = text.lstrip()
      if stripped.startswith("["):
        for n, row in enumerate(json.loads(text), 1):
          where = f"{path} item {n}"
          if strict and not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object ({type(row).__name__})")
          yield n, where, row
        return
      for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
          if strict and not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: not a JSON object (a {type(row).__name__})")
          yield n, f"{path}:{n}", row
    else:
      raise ValueError(f"{path}: unknown file type {ext!r} (use .csv, .tsv, .jsonl or .json, "
                       "optionally .gz)")


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line) of a plain-text file (optionally gzipped), every line, blank ones
  included: prediction's "one example per line", where a blank line is a bad example."""
  with _open_text(path) as f:
    lines = f.read().split("\n")
  if lines and lines[-1] == "":  # the newline that ends the last line
    lines.pop()
  for n, line in enumerate(lines, 1):
    yield n, line.rstrip("\r")


def read_rows(path: str) -> Iterator[dict[str, Any]]:
  """Rows of a .csv / .tsv (header line) or .jsonl / .json (JSON lines or one list) file,
  optionally gzipped."""
  for _, _, row in numbered_rows(path):
    yield row


def _split_field(task: ml_collections.ConfigDict, split: str, prefix: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  return task[f"{split}_{prefix}"]


def _tfds_source(task: ml_collections.ConfigDict, split: str):
  """(tfds data source, builder info) for the task's dataset and split."""
  import tensorflow_datasets as tfds
  import tensorflow_datasets.text  # noqa: F401  (registers the text datasets)

  name = task.tfds_name
  if not name:
    raise ValueError("task.source='tfds' needs task.tfds_name (e.g. glue/sst2).")
  tfds_split = _split_field(task, split, "split")
  data_dir = task.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"Unknown tfds dataset {name!r}.") from e
  except ModuleNotFoundError as e:
    raise ValueError(f"tfds dataset {name!r} needs TensorFlow to build ({e}); export it to "
                     "JSONL and use task.source='files'.") from e
  try:
    source = tfds.data_source(name, split=tfds_split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001  (tfds raises many types; all mean "cannot read")
    raise ValueError(
        f"Cannot read split {tfds_split!r} of tfds dataset {name!r} from {builder.data_dir}. "
        f"Prepare it with `tfds build {name} --file_format=array_record`. "
        f"({type(e).__name__}: {e})") from e
  return source, builder.info


def _tfds_rows(source) -> Iterator[dict[str, Any]]:
  for i in range(len(source)):
    yield source[i]


def class_names_from_info(info: Any, key: str) -> list[str] | None:
  feature = info.features[key] if key in info.features else None
  feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for tags
  names = getattr(feature, "names", None)
  return list(names) if names else None


def _text(value: Any) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return "" if value is None else str(value)


def _list(value: Any) -> list[Any]:
  if isinstance(value, np.ndarray):
    return [v.item() if isinstance(v, np.generic) else v for v in value]
  if isinstance(value, str):
    return json.loads(value) if value.strip().startswith("[") else value.split()
  return list(value)


def _scalar(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode() if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------- per kind


class _Labels:
  """String or integer labels -> class ids, against a known or inferred label set."""

  def __init__(self, names: list[str] | None):
    self.names = names
    self.index = {n: i for i, n in enumerate(names)} if names else None
    # Labels given but outside the label set (e.g. dev labels never seen in train); a
    # missing label (None, "", GLUE's -1) is not counted here.
    self.unknown: collections.Counter = collections.Counter()

  def __call__(self, value: Any) -> int | None:
    value = _scalar(value)
    if value is None or (isinstance(value, str) and not value.strip()):
      return None
    if isinstance(value, str):
      if self.index is not None and value in self.index:
        return self.index[value]
      try:
        value = int(value)
      except ValueError:
        self.unknown[value] += 1
        return None
    value = int(value)
    if value < 0:
      return None
    if self.names is not None and value >= len(self.names):
      self.unknown[str(value)] += 1
      return None
    return value


def _get(row: dict[str, Any], key: str, where: str) -> Any:
  if key not in row:
    raise ValueError(f"{where}: no field {key!r}; its records have {sorted(row)}. "
                     "Set the matching task.*_key.")
  return row[key]


def _records(kind: str, task: ml_collections.ConfigDict, rows: Iterable[dict[str, Any]],
             labels: _Labels, where: str, skipped: collections.Counter,
             limit: int) -> list[dict[str, Any]]:
  out: list[dict[str, Any]] = []
  for row in rows:
    if limit and len(out) >= limit:
      break
    if kind in ("classification", "regression"):
      text = _text(_get(row, task.text_key, where))
      pair = _text(_get(row, task.text_pair_key, where)) if task.text_pair_key else None
      raw = _scalar(_get(row, task.label_key, where))
      if kind == "regression":
        try:
          label = float(raw)
        except (TypeError, ValueError):
          label = None
      else:
        before = sum(labels.unknown.values())
        label = labels(raw)
        if label is None and sum(labels.unknown.values()) > before:
          skipped[UNKNOWN_LABEL] += 1
          continue
      if label is None:
        skipped["no usable label"] += 1
        continue
      out.append({"text": text, "text_pair": pair, "label": label})
    elif kind == "tagging":
      tokens = [_text(t) for t in _list(_get(row, task.tokens_key, where))]
      tags = [labels(t) for t in _list(_get(row, task.tags_key, where))]
      if any(t is None for t in tags):
        skipped["unknown tag"] += 1
        continue
      if len(tags) != len(tokens):
        skipped["tokens and tags of different lengths (kept, cut to the shorter)"] += 1
        n = min(len(tags), len(tokens))
        tokens, tags = tokens[:n], tags[:n]
      if not tokens:
        skipped["no tokens"] += 1
        continue
      out.append({"tokens": tokens, "tags": tags})
    elif kind == "qa":
      answers = _get(row, task.answers_key, where)
      if isinstance(answers, str):
        answers = json.loads(answers)
      if isinstance(answers, dict):
        texts = [_text(t) for t in _list(answers.get("text", []))]
        starts = [int(s) for s in _list(answers.get("answer_start", []))]
        answers = [{"text": t, "start": s} for t, s in zip(texts, starts)]
      else:
        answers = [{"text": _text(a["text"]), "start": int(a.get("answer_start",
                                                                 a.get("start", -1)))}
                   for a in answers]
      if task.impossible_key and task.impossible_key in row and bool(
          _scalar(row[task.impossible_key])):
        answers = []
      answers = [a for a in answers if a["text"].strip()]
      if not answers and not task.version_2:
        skipped["no answer (set task.version_2 for unanswerable questions)"] += 1
        continue
      qid = _text(row[task.id_key]) if task.id_key in row else str(len(out))
      out.append({"id": qid, "question": _text(_get(row, task.question_key, where)),
                  "context": _text(_get(row, task.context_key, where)), "answers": answers})
    elif kind == "multiple_choice":
      context = _text(_get(row, task.context_key, where)) if task.context_key else ""
      prefix = _text(_get(row, task.question_key, where)) if task.question_key else ""
      keys = [k.strip() for k in task.choices_key.split(",") if k.strip()]
      if len(keys) == 1:
        choices = [_text(c) for c in _list(_get(row, keys[0], where))]
      else:
        choices = [_text(_get(row, k, where)) for k in keys]
      label = labels(_get(row, task.label_key, where))
      if len(choices) != task.num_choices:
        skipped[f"not {task.num_choices} choices (task.num_choices)"] += 1
        continue
      if label is None or label >= len(choices):
        skipped["no usable label"] += 1
        continue
      choices = [f"{prefix} {c}".strip() if prefix else c for c in choices]
      out.append({"context": context, "choices": choices, "label": label})
    else:
      raise ValueError(f"unknown task kind {kind!r}")
  return out


def _input_field(row: dict[str, Any], task: ml_collections.ConfigDict, field: str,
                 where: str, *, key: str | None = None, text: bool = True) -> Any:
  """row[task.<field>] (or row[key]); a missing field, or an empty text, is an error
  naming `where` and the config field that names it."""
  key = key or task[field]
  if key not in row:
    raise ValueError(f"{where}: no field {key!r} (the workdir's task.{field}); the row has "
                     f"{sorted(row)}")
  if not text:
    return row[key]
  value = _text(row[key])
  if not value.strip():
    raise ValueError(f"{where}: empty text in field {key!r} (task.{field})")
  return value


def input_record(kind: str, task: ml_collections.ConfigDict, row: dict[str, Any],
                 where: str) -> dict[str, Any]:
  """One unlabelled record of `kind` (the shapes of the module docstring, without labels)
  from a row of new data: what prediction featurizes. Where `_records` skips a row it
  cannot use and counts it, a row here is one the user asked about: a missing field, an
  empty text or the wrong number of choices is an error naming `where`."""
  if kind in ("classification", "regression"):
    pair = _input_field(row, task, "text_pair_key", where) if task.text_pair_key else None
    return {"text": _input_field(row, task, "text_key", where), "text_pair": pair}
  if kind == "tagging":
    value = _input_field(row, task, "tokens_key", where, text=False)
    tokens = [t for t in (_text(v) for v in _list(value)) if t.strip()]
    if not tokens:
      raise ValueError(f"{where}: no tokens in field {task.tokens_key!r} (task.tokens_key)")
    return {"tokens": tokens}
  if kind == "qa":
    record = {"question": _input_field(row, task, "question_key", where),
              "context": _input_field(row, task, "context_key", where), "answers": []}
    if task.id_key and task.id_key in row:
      record["id"] = _text(row[task.id_key])
    return record
  if kind == "multiple_choice":
    context = _input_field(row, task, "context_key", where) if task.context_key else ""
    prefix = _input_field(row, task, "question_key", where) if task.question_key else ""
    keys = [k.strip() for k in task.choices_key.split(",") if k.strip()]
    if len(keys) == 1:
      value = _input_field(row, task, "choices_key", where, key=keys[0], text=False)
      choices = [_text(c) for c in _list(value)]
    else:
      choices = [_input_field(row, task, "choices_key", where, key=k) for k in keys]
    if len(choices) != task.num_choices:
      raise ValueError(f"{where}: {len(choices)} choices; the model was fine-tuned with "
                       f"task.num_choices={task.num_choices}")
    choices = [f"{prefix} {c}".strip() if prefix else c for c in choices]
    return {"context": context, "choices": choices}
  raise ValueError(f"unknown task kind {kind!r}")


def _parse_names(names: str) -> list[str] | None:
  names = [n.strip() for n in (names or "").split(",") if n.strip()]
  return names or None


def _infer_label_names(kind: str, task: ml_collections.ConfigDict,
                       rows: list[dict[str, Any]]) -> list[str] | None:
  """Sorted string labels of the train rows (None when the labels are integers)."""
  key = task.tags_key if kind == "tagging" else task.label_key
  values: set[str] = set()
  for row in rows:
    if key not in row:
      continue
    vs = _list(row[key]) if kind == "tagging" else [_scalar(row[key])]
    for v in vs:
      if isinstance(v, str) and v.strip():
        try:
          int(v)
        except ValueError:
          values.add(v)
  return sorted(values) or None


def read_split(task: ml_collections.ConfigDict, split: str,
               label_names: list[str] | None = None) -> TaskData:
  """The records of `split` ("train" or "dev"). For "dev", pass the train split's
  label_names so that both map labels alike."""
  kind = task.kind
  limit = int(task.get(f"max_{split}_examples") or 0)
  skipped: collections.Counter = collections.Counter()
  label_names = label_names or _parse_names(task.label_names)
  if task.source == "bundled":
    if kind != "classification":
      raise ValueError("task.source='bundled' is the 6-class section task: "
                       "task.kind must be 'classification'")
    path = str(bundled.task_path(split))
    rows: Iterable[dict[str, Any]] = read_rows(path)
    label_names = label_names or bundled.task_label_names()
    where = f"bundled task {split} ({path})"
  elif task.source == "files":
    globs = _split_field(task, split, "files")
    if not globs:
      raise ValueError(f"task.source='files' needs task.{split}_files (comma-separated "
                       "globs of .csv/.tsv/.jsonl files).")
    files = expand_globs(globs)
    rows = [r for f in files for r in read_rows(f)]
    if kind in ("classification", "tagging", "multiple_choice") and not label_names:
      label_names = _infer_label_names(kind, task, rows)
    where = f"files {globs!r}"
  elif task.source == "tfds":
    source, info = _tfds_source(task, split)
    if kind in ("classification", "tagging") and not label_names:
      label_names = class_names_from_info(
          info, task.tags_key if kind == "tagging" else task.label_key)
    rows = _tfds_rows(source)
    where = f"tfds {task.tfds_name!r} split {_split_field(task, split, 'split')!r}"
  else:
    raise ValueError(f"task.source: {task.source!r} is not one of {SOURCES}")
  if kind == "multiple_choice":
    label_names = None
  labels = _Labels(label_names)
  records = _records(kind, task, rows, labels, where, skipped, limit)
  total = len(records) + sum(skipped.values())
  if labels.unknown:
    n = sum(labels.unknown.values())
    shown = dict(labels.unknown.most_common(8))
    message = (f"{where}: {n:,} of {total:,} records have a label outside the label set "
               f"{label_names} (from task.label_names, the source, or the train split's "
               f"labels): {shown}")
    if not task.get("drop_unknown_labels"):
      raise ValueError(f"{message}. Scores over the other records would hide them: add "
                       "the labels to --config.task.label_names, fix the data, or set "
                       "--config.task.drop_unknown_labels=True to drop these records.")
    print(f"warning: {message}; dropped (task.drop_unknown_labels=True): scores are over "
          f"the other {len(records):,}.", file=sys.stderr, flush=True)
  if skipped:
    logging.warning("%s: skipped %s of %s records: %s", where, f"{sum(skipped.values()):,}",
                    f"{total:,}", dict(skipped))
  if not records:
    detail = f" (skipped: {dict(skipped)})" if skipped else ""
    raise ValueError(f"No usable {kind} example in {where}{detail}.")
  if kind == "classification" and label_names is None:
    label_names = [str(i) for i in range(max(r["label"] for r in records) + 1)]
  if kind == "tagging" and label_names is None:
    raise ValueError(f"{where}: tagging needs tag names (task.label_names, e.g. "
                     "'O,B-PER,I-PER') for entity-level F1")
  return TaskData(records, label_names, dict(skipped), where)


def write_records(path: str, task: ml_collections.ConfigDict,
                  records: Iterable[dict[str, Any]]) -> int:
  """Classification / regression records back as JSONL rows under the task's own field
  names (text_key, text_pair_key, label_key; the label as its class id), which
  task.source='files' reads back to the same records when task.label_names is the full
  label set: how k-fold splits and pseudo-labels reach the loop. Returns the row count."""
  if task.kind not in ("classification", "regression"):
    raise ValueError(f"write_records: task.kind={task.kind!r} is not classification or "
                     "regression")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp, n = path + ".tmp", 0
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      row = {task.text_key: r["text"], task.label_key: r["label"]}
      if task.text_pair_key:
        row[task.text_pair_key] = r["text_pair"] or ""
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
      n += 1
  os.replace(tmp, path)
  return n
