"""Pseudo-labelling (self-training, classification): a fine-tuned workdir labels an
unlabelled file, the rows it is sure of join the training set, and a new run trains on both.

The teacher predicts with `predict.predict_task` (what launch.predict runs); a row is kept
when its largest class probability, as predict reports it, is >= the threshold, and gets
the predicted class as its label. The student is the teacher's own config (the same
init, recipe and seed: the comparison isolates the extra data) reading JSONL files through
task.source="files": the teacher's training records (task.max_train_examples applied; for
the bundled or tfds source, written out first), the kept rows, and its dev records, so the
new dev score stands next to the original's on the same examples.

OUT/data/ holds train.jsonl, pseudo_labels.jsonl and dev.jsonl; OUT/teacher_predictions.jsonl
every unlabelled row's prediction with its confidence and whether it was kept; OUT/run the
new workdir (resumed like any other); OUT/pseudo.json the counts and both dev scores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from bert_jax import run_config
from bert_jax.compress import workdir as finetuned_lib
from bert_jax.finetune import kfold, loop, predict, readers

RESULTS_FILE = "pseudo.json"
RUN_DIR = "run"


@dataclasses.dataclass
class Pseudo:
  teacher: str
  input: str
  threshold: float
  rows: int  # unlabelled rows
  kept: int  # rows at or above the threshold
  n_train: int  # the teacher's training records
  n_train_new: int  # the new run's: n_train + kept
  main_metric: str
  original: float  # the teacher's best dev main metric
  new: float  # the new run's
  workdir: str  # the new run


def pseudo_label(workdir: str, input_path: str, out: str, threshold: float, *,
                 which: str = "best", batch_size: int = 64,
                 finetune: Callable = loop.finetune,
                 log: Callable[[str], None] = print) -> Pseudo:
  """Labels `input_path` with `workdir`, keeps rows with max probability >= threshold and
  fine-tunes OUT/run on the teacher's training records plus those rows."""
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold={threshold} must be in (0, 1] (a class probability)")
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  if predict.workdir_mode(workdir) != predict.FINETUNED:
    raise ValueError(f"{workdir!r} is not a fine-tuned workdir (no encoder_config.json)")
  config = finetuned_lib.full_config(run_config.load(workdir))
  task = config.task
  if task.kind != "classification":
    raise ValueError(f"pseudo-labelling keeps rows by their largest class probability: "
                     f"classification only; {workdir!r} has task.kind={task.kind!r}")
  request = {"teacher": workdir, "input": os.path.abspath(input_path),
             "threshold": threshold, "which": which}
  results_path = os.path.join(out, RESULTS_FILE)
  if os.path.exists(results_path):
    with open(results_path) as f:
      saved = json.load(f)
    if {k: saved.get(k) for k in request} != request:
      raise ValueError(f"{out!r} holds pseudo-labels of {saved.get('teacher')!r} on "
                       f"{saved.get('input')!r} at threshold {saved.get('threshold')}: "
                       "use another --out")
  examples = predict.read_examples(input_path, task.kind, task)
  teacher = finetuned_lib.load_finetuned(workdir, which)
  names = teacher.label_names
  rows = predict.predict_task(teacher, examples, batch_size=batch_size)
  confidence = [max(r["probabilities"].values()) for r in rows]
  keep = [c >= threshold for c in confidence]
  if not any(keep):
    raise ValueError(f"no row of {input_path} reaches threshold {threshold} (the most "
                     f"confident has {max(confidence):.5f}): lower --threshold")
  if not os.path.exists(results_path):  # claimed before the data are written: a
    os.makedirs(out, exist_ok=True)  # relaunch with other settings cannot change them
    loop._write_json(results_path, request)
  data = os.path.join(out, "data")
  predict.write_jsonl(os.path.join(out, "teacher_predictions.jsonl"),
                      [dict(r, confidence=c, kept=k)
                       for r, c, k in zip(rows, confidence, keep)])
  train = readers.read_split(task, "train", names).records
  dev = readers.read_split(task, "dev", names).records
  files = {name: os.path.join(data, f"{name}.jsonl") for name in ("train", "pseudo_labels",
                                                                  "dev")}
  readers.write_records(files["train"], task, train)
  kept = readers.write_records(
      files["pseudo_labels"], task,
      ({**e.record, "label": names.index(r["label"])}
       for e, r, k in zip(examples, rows, keep) if k))
  readers.write_records(files["dev"], task, dev)
  run = os.path.join(out, RUN_DIR)
  result = kfold.finished(run)
  if result is None:
    log(f"== {len(train)} training records + {kept} of {len(rows)} pseudo-labelled rows "
        f"(max probability >= {threshold}) -> {run}")
    t0 = time.perf_counter()
    c = kfold.files_config(config, [files["train"], files["pseudo_labels"]], files["dev"],
                           names)
    result = dataclasses.asdict(finetune(c, run, quiet=True))
    if result.get("signal"):
      raise kfold.Preempted(run, result["signal"])
    log(f"   {task.main_metric}={result['best'][task.main_metric]:.4f} "
        f"({time.perf_counter() - t0:.0f} s)")
  main = task.main_metric
  summary = Pseudo(workdir, request["input"], threshold, len(rows), kept, len(train),
                   len(train) + kept, main, float(teacher.scores.get(main, float("nan"))),
                   float(result["best"][main]), run)
  os.makedirs(out, exist_ok=True)
  loop._write_json(results_path, {**dataclasses.asdict(summary), "which": which,
                                  "original_scores": teacher.scores,
                                  "new_scores": result["best"]})
  return summary
