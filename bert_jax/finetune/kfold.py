"""K-fold cross-validation on a task's training records (classification and regression).

The training records (task.max_train_examples applies) are split into K folds by
scikit-learn, stratified by label for classification (StratifiedKFold; KFold for
regression), shuffled with config.seed, so the same config and K give the same folds.
Fold k is an ordinary fine-tuning workdir, OUT/fold<k>, that trains on the other K - 1
folds and evaluates on fold k; a fold with its results.json is done and is read back, so
an interrupted run resumes where it stopped (the loop resumes a fold cut mid-run).

How a fold reaches the loop: its train and held-out records are written as JSONL files
(OUT/data/fold<k>.train.jsonl, .dev.jsonl, under the task's field names) and the fold's
config reads them with task.source="files", task.label_names fixed to the full label set
(so every fold has the same classes in the same order, even one that misses a class) and
the example limits off. Rather than a new in-memory source in readers.py, this keeps each
fold workdir self-contained: its config.json names the data it trained and was scored
on, so resume, launch.predict, ensembling and init-from-fold work on it unchanged, and
the files show exactly what each fold held.

OUT/oof_predictions.jsonl holds every training record's out-of-fold prediction (from its
fold's best checkpoint: predictions_dev.jsonl), and OUT/cv.json each fold's dev scores,
the CV scores (the task's metrics on the concatenated out-of-fold predictions) and the
main metric's mean and sd over folds. OUT/folds.json records the assignment; a relaunch
with another K, seed or training set is refused rather than mixing folds.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from bert_jax.finetune import loop, readers, scores as scores_lib

KINDS = ("classification", "regression")
FOLDS_FILE = "folds.json"
OOF_FILE = "oof_predictions.jsonl"
CV_FILE = "cv.json"


@dataclasses.dataclass
class CV:
  out: str
  k: int
  main_metric: str
  folds: list[dict[str, Any]]  # per fold: fold, workdir, n_train, n_dev, score, scores
  cv: dict[str, float]  # the task's metrics on all out-of-fold predictions
  mean: float  # of the folds' main metric
  sd: float  # over folds (ddof=1; nan for one fold)


def check_kind(task: ml_collections.ConfigDict, what: str) -> None:
  if task.kind not in KINDS:
    raise ValueError(f"{what} serves {' and '.join(KINDS)} tasks; task.kind={task.kind!r}")


def file_pattern(path: str) -> str:
  """`path` as one entry of task.train_files (a comma-separated list of globs)."""
  path = os.path.abspath(path)
  if "," in path:
    raise ValueError(f"{path!r}: a path with a comma cannot be named in task.*_files "
                     "(comma-separated globs); choose another output directory")
  return glob.escape(path)


def files_config(config: ml_collections.ConfigDict, train: Sequence[str], dev: str,
                 label_names: list[str] | None) -> ml_collections.ConfigDict:
  """`config` reading these JSONL files (written by readers.write_records) with the full
  label set and no example limits."""
  if label_names and any("," in n for n in label_names):
    raise ValueError(f"label names {label_names} hold a comma: task.label_names cannot "
                     "list them")
  c = ml_collections.ConfigDict(config.to_dict())
  c.task.update(dict(source="files", train_files=",".join(file_pattern(p) for p in train),
                     dev_files=file_pattern(dev), label_names=",".join(label_names or []),
                     max_train_examples=0, max_dev_examples=0))
  c.lock()
  return c


def fold_assignment(labels: Sequence[Any], k: int, seed: int, stratify: bool) -> np.ndarray:
  """The fold (0..k-1) of each record: StratifiedKFold by label, or KFold, shuffled."""
  from sklearn import model_selection
  n = len(labels)
  if k < 2 or k > n:
    raise ValueError(f"k={k} folds must be in 2..{n} (the training records)")
  if stratify:
    counts = np.bincount(np.asarray(labels, np.int64))
    if counts[counts > 0].max() < k:
      raise ValueError(f"k={k} folds: no class has {k} training records (the largest "
                       f"has {counts.max()}); stratified folds need that many")
    splitter = model_selection.StratifiedKFold(k, shuffle=True, random_state=seed)
  else:
    splitter = model_selection.KFold(k, shuffle=True, random_state=seed)
  fold = np.full(n, -1, np.int64)
  for i, (_, held_out) in enumerate(splitter.split(np.zeros((n, 1)), labels)):
    fold[held_out] = i
  return fold


def _check_assignment(path: str, record: dict[str, Any]) -> None:
  """A relaunch must see the folds the finished ones were trained on."""
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != record:
      raise ValueError(f"{path}: these folds were made with k={saved.get('k')}, seed="
                       f"{saved.get('seed')} over {len(saved.get('fold', []))} training "
                       f"records; this run has k={record['k']}, seed={record['seed']} over "
                       f"{len(record['fold'])}: use another --out")
  else:
    loop._write_json(path, record)


class Preempted(RuntimeError):
  """A run ended by a signal after its checkpoint: relaunching resumes it."""

  def __init__(self, workdir: str, signal: int):
    super().__init__(f"{workdir}: stopped by signal {signal} after a checkpoint; relaunch "
                     "the same command to resume")
    self.signal = signal


def finished(workdir: str) -> dict[str, Any] | None:
  """The run's results.json when it ran to its end (not when a signal stopped it)."""
  path = os.path.join(workdir, loop.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  return None if result.get("signal") else result


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def task_scores(task: ml_collections.ConfigDict, labels: Sequence[Any],
                preds: Sequence[Any], num_classes: int | None) -> dict[str, float]:
  """The task's dev metrics (task.metrics) on these labels and predictions."""
  names = [m.strip() for m in task.metrics.split(",") if m.strip()]
  if task.kind == "classification":
    return scores_lib.classification_scores(np.asarray(preds), np.asarray(labels),
                                            int(num_classes), names)
  return scores_lib.regression_scores(np.asarray(preds, np.float64),
                                      np.asarray(labels, np.float64), names)


def run_kfold(config: ml_collections.ConfigDict, k: int, out: str, *,
              finetune: Callable = loop.finetune,
              log: Callable[[str], None] = print) -> CV:
  """Fine-tunes the K folds of config's training records in OUT/fold<k> (resuming done
  ones) and writes OUT/oof_predictions.jsonl and OUT/cv.json."""
  check_kind(config.task, "k-fold cross-validation")
  scores_lib.check_metrics(config.task)
  out = os.path.abspath(out)
  data = readers.read_split(config.task, "train")
  records, names = data.records, data.label_names
  labels = [r["label"] for r in records]
  classification = config.task.kind == "classification"
  fold = fold_assignment(labels, k, int(config.seed), classification)
  os.makedirs(out, exist_ok=True)
  _check_assignment(os.path.join(out, FOLDS_FILE),
                    {"k": k, "seed": int(config.seed), "stratified": classification,
                     "label_names": names if classification else None,
                     "fold": fold.tolist()})
  main = config.task.main_metric
  oof: list[dict[str, Any] | None] = [None] * len(records)
  folds = []
  for i in range(k):
    held = np.flatnonzero(fold == i)
    kept = np.flatnonzero(fold != i)
    wd = os.path.join(out, f"fold{i}")
    train_file = os.path.join(out, "data", f"fold{i}.train.jsonl")
    dev_file = os.path.join(out, "data", f"fold{i}.dev.jsonl")
    readers.write_records(train_file, config.task, (records[j] for j in kept))
    readers.write_records(dev_file, config.task, (records[j] for j in held))
    result = finished(wd)
    t0 = time.perf_counter()
    if result is None:
      log(f"== fold {i + 1}/{k}: {len(kept)} train / {len(held)} held out -> {wd}")
      c = files_config(config, [train_file], dev_file, names if classification else None)
      result = dataclasses.asdict(finetune(c, wd, quiet=True))
      if result.get("signal"):
        raise Preempted(wd, result["signal"])
      log(f"   {main}={result['best'][main]:.4f} ({time.perf_counter() - t0:.0f} s)")
    rows = read_jsonl(os.path.join(wd, loop.PREDICTIONS_FILE))
    if len(rows) != len(held):
      raise ValueError(f"{wd}: {len(rows)} dev predictions for the {len(held)} records of "
                       f"fold {i} (was the fold's data changed?)")
    for row in rows:
      j = int(held[row["index"]])
      entry = {"index": j, "fold": i, "label": row["label"], "prediction": row["prediction"]}
      if classification:
        entry["probabilities"] = row["probabilities"]
        if names:
          entry.update(label_name=names[row["label"]], predicted_name=names[row["prediction"]])
      oof[j] = entry
    folds.append({"fold": i, "workdir": wd, "n_train": int(len(kept)),
                  "n_dev": int(len(held)), "score": result["best"][main],
                  "scores": result["best"], "best_step": result["best_step"]})
  loop._write_jsonl(os.path.join(out, OOF_FILE), oof)
  cv = task_scores(config.task, [r["label"] for r in oof], [r["prediction"] for r in oof],
                   len(names) if names else None)
  per_fold = np.asarray([f["score"] for f in folds], np.float64)
  sd = float(per_fold.std(ddof=1)) if k > 1 else math.nan
  result = CV(out, k, main, folds, cv, float(per_fold.mean()), sd)
  loop._write_json(os.path.join(out, CV_FILE),
                   {**dataclasses.asdict(result), "seed": int(config.seed),
                    "task": config.task.name, "n": len(records),
                    "stratified": classification})
  return result
