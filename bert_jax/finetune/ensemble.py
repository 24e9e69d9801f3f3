"""Ensembles of fine-tuned workdirs of one task: the mean of the members' probabilities
(classification; the prediction is its argmax) or of their outputs (regression).

Each member predicts with `predict.predict_task`, what launch.predict runs, so a member's
part of the ensemble is exactly its own predictions on the same rows. The rows are the
first member's configured dev split by default (with its labels; for a k-fold member,
its held-out fold), or an input file (CSV/TSV/JSONL rows with the task's fields, scored
where every row has task.label_key; plain text: predictions only). Members must share the
task (name, kind and label set, in order): averaging probabilities of different classes
means nothing, so that is refused before any weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from bert_jax import run_config
from bert_jax.compress import workdir as finetuned_lib
from bert_jax.finetune import kfold, loop, predict, readers

PREDICTIONS_FILE = "ensemble_predictions.jsonl"
RESULTS_FILE = "ensemble.json"


@dataclasses.dataclass
class Member:
  workdir: str
  config: ml_collections.ConfigDict
  label_names: list[str] | None


@dataclasses.dataclass
class Ensemble:
  workdirs: list[str]
  input: str  # the dev split's description or the input file
  n: int
  main_metric: str
  members: list[dict[str, float]]  # each member's scores on the rows ({} without labels)
  scores: dict[str, float]  # the ensemble's
  rows: list[dict[str, Any]]


def task_signature(m: Member) -> dict[str, Any]:
  t = m.config.task
  return {"task.name": t.name, "task.kind": t.kind, "labels": m.label_names}


def load_members(workdirs: Sequence[str]) -> list[Member]:
  """The members' configs and label sets, refused unless they share the task."""
  if len(workdirs) < 2:
    raise ValueError(f"an ensemble needs at least two workdirs; got {list(workdirs)}")
  members = []
  for wd in workdirs:
    wd = os.path.abspath(wd)
    if predict.workdir_mode(wd) != predict.FINETUNED:
      raise ValueError(f"{wd!r} is not a fine-tuned workdir (no encoder_config.json)")
    config = finetuned_lib.full_config(run_config.load(wd))
    kfold.check_kind(config.task, "ensembling")
    labels_file = os.path.join(wd, "labels.json")
    names = None
    if os.path.isfile(labels_file):
      with open(labels_file) as f:
        names = json.load(f)
    members.append(Member(wd, config, names))
  first = task_signature(members[0])
  for m in members[1:]:
    mine = task_signature(m)
    diff = [k for k in first if first[k] != mine[k]]
    if diff:
      raise ValueError(f"ensemble members of different tasks: {m.workdir!r} has "
                       + ", ".join(f"{k}={mine[k]!r}" for k in diff) + f" where "
                       f"{members[0].workdir!r} has "
                       + ", ".join(f"{k}={first[k]!r}" for k in diff))
  return members


def _labelled_file(task: ml_collections.ConfigDict, path: str,
                   label_names: list[str] | None) -> list[Any] | None:
  """The labels of an input file's rows when every row has one (else None)."""
  if not predict.is_table(path) or not all(task.label_key in row
                                           for row in readers.read_rows(path)):
    return None
  c = ml_collections.ConfigDict(task.to_dict())
  c.update(dict(source="files", dev_files=kfold.file_pattern(path), max_dev_examples=0,
                label_names=",".join(label_names or [])))
  data = readers.read_split(c, "dev", label_names)
  return [r["label"] for r in data.records]


def ensemble_input(m: Member, input_path: str | None
                   ) -> tuple[list[predict.Example], list[Any] | None, str]:
  """(examples, gold labels or None, description): m's dev split, or the input file."""
  task = m.config.task
  if input_path is None:
    data = readers.read_split(task, "dev", m.label_names)
    examples = [predict.Example(i + 1, f"{data.description} record {i + 1}",
                                {"text": r["text"], "text_pair": r["text_pair"]})
                for i, r in enumerate(data.records)]
    return examples, [r["label"] for r in data.records], f"dev split of {m.workdir}"
  examples = predict.read_examples(input_path, task.kind, task)
  labels = _labelled_file(task, input_path, m.label_names)
  if labels is not None and len(labels) != len(examples):
    raise ValueError(f"{input_path}: {len(examples) - len(labels)} of {len(examples)} rows "
                     f"have no usable {task.label_key!r}; label every row or none")
  return examples, labels, os.path.abspath(input_path)


def member_outputs(kind: str, rows: Sequence[dict[str, Any]], names: list[str] | None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities [n, classes] or values [n], predictions [n]) of predict_task's rows."""
  if kind == "classification":
    probs = np.asarray([[r["probabilities"][n] for n in names] for r in rows], np.float64)
    return probs, np.asarray([names.index(r["label"]) for r in rows], np.int64)
  values = np.asarray([r["value"] for r in rows], np.float64)
  return values, values


def ensemble(workdirs: Sequence[str], input_path: str | None = None, out: str | None = None,
             *, which: str = "best", batch_size: int = 64) -> Ensemble:
  """Averages the members' probabilities (or outputs) on the rows; scores each member and
  the ensemble where the rows have labels; writes OUT/ensemble_predictions.jsonl and
  OUT/ensemble.json when `out` is given."""
  members = load_members(workdirs)
  first = members[0]
  task, names = first.config.task, first.label_names
  examples, labels, source = ensemble_input(first, input_path)
  outputs, member_scores = [], []
  for m in members:
    ft = finetuned_lib.load_finetuned(m.workdir, which)
    out_m, pred_m = member_outputs(task.kind, predict.predict_task(
        ft, examples, batch_size=batch_size), names)
    outputs.append(out_m)
    member_scores.append({} if labels is None else kfold.task_scores(
        task, labels, pred_m, len(names) if names else None))
  mean = np.mean(np.stack(outputs), axis=0)
  classification = task.kind == "classification"
  preds = mean.argmax(-1) if classification else mean
  scores = {} if labels is None else kfold.task_scores(task, labels, preds,
                                                       len(names) if names else None)
  rows = []
  for i, e in enumerate(examples):
    row: dict[str, Any] = {"line": e.line, "text": e.record["text"]}
    if e.record.get("text_pair") is not None:
      row["text_pair"] = e.record["text_pair"]
    if labels is not None:
      row["label"] = labels[i]
    if classification:
      row.update(prediction=int(preds[i]), probabilities=[float(p) for p in mean[i]])
      if labels is not None:
        row["label_name"] = names[labels[i]]
      row["predicted_name"] = names[int(preds[i])]
    else:
      row["prediction"] = float(preds[i])
    rows.append(row)
  result = Ensemble([m.workdir for m in members], source, len(rows), task.main_metric,
                    member_scores, scores, rows)
  if out:
    os.makedirs(out, exist_ok=True)
    predict.write_jsonl(os.path.join(out, PREDICTIONS_FILE), rows)
    loop._write_json(os.path.join(out, RESULTS_FILE),
                     {k: v for k, v in dataclasses.asdict(result).items() if k != "rows"})
  return result
