r"""Task-adaptive continued pretraining (TAPT, Gururangan et al. 2020) on the bundled task.

  python -m launch.continued_demo --init runs/demo/pretrain --out runs/continued \
      [--steps 300] [--seeds 0,1,2,3,4] [--epochs 1]

1. Writes the bundled task's training verses, without their labels, as a text corpus (one
   verse per document; every 20th verse held out for the MLM eval). The dev verses are
   never read.
2. Continues pretraining --init with MLM for --steps on them (OUT/tapt) and, as the
   control that spends the same compute on text the checkpoint already saw, for --steps
   on the bundled pretraining corpus (OUT/more_corpus). Both through `init_from`: the
   checkpoint's weights and tokenizer, a new optimizer.
3. Fine-tunes --init, OUT/tapt and OUT/more_corpus with every seed (launch.finetune_tricks'
   recipe) and writes OUT/results.md: each init's dev score with its 95% interval, and the
   paired difference with --init on the same seeds ("noise" where the interval holds 0),
   OUT/results.json and OUT/continued.png. Relaunching resumes every step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags
from absl import logging as absl_logging

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("init", None, "The pretraining workdir to continue from.", required=True)
flags.DEFINE_string("out", None, "Where the runs and the report go.", required=True)
flags.DEFINE_integer("steps", 300, "Continued-pretraining steps (each arm).")
flags.DEFINE_string("seeds", "0,1,2,3,4", "Comma-separated fine-tuning seeds.")
flags.DEFINE_float("epochs", 1.0, "Fine-tuning epochs of every run.")

HELD_OUT_EVERY = 20


def write_task_corpus(out_dir: str) -> tuple[str, str]:
  """The task's training texts as one-sentence documents: (train file, eval file)."""
  import gzip

  from bert_jax.data import bundled

  os.makedirs(out_dir, exist_ok=True)
  paths = (os.path.join(out_dir, "train.txt"), os.path.join(out_dir, "eval.txt"))
  if all(os.path.exists(p) for p in paths):
    return paths
  with gzip.open(bundled.task_path("train"), "rt", encoding="utf-8") as f:
    texts = [" ".join(json.loads(line)["text"].split()) for line in f if line.strip()]
  splits = ([t for i, t in enumerate(texts) if i % HELD_OUT_EVERY],
            [t for i, t in enumerate(texts) if not i % HELD_OUT_EVERY])
  for path, part in zip(paths, splits):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write("\n\n".join(part) + "\n")
    os.replace(path + ".tmp", path)
  return paths


def continued_config(init: str, steps: int, train_files: str = "", eval_files: str = ""):
  from configs.pretrain import get_config

  c = get_config("bert,tiny")
  c.objectives = "mlm:1.0"
  c.init_from = init
  if train_files:
    c.data.update(dict(source="text", train_files=train_files, eval_files=eval_files))
  c.train.update(dict(steps=steps, eval_every=max(steps // 3, 1),
                      checkpoint_every=max(steps // 3, 1)))
  return c


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bert_jax import train
  from bert_jax.compile_cache import use_compilation_cache
  from bert_jax.finetune import compare, grid

  seeds = errors.seeds(FLAGS.seeds)
  if FLAGS.steps < 1:
    errors.fail(f"--steps={FLAGS.steps}: at least 1")
  init = os.path.abspath(FLAGS.init)
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  use_compilation_cache(os.path.join(out, "jax_cache"))
  train_file, eval_file = write_task_corpus(os.path.join(out, "task_text"))
  arms = {"tapt": continued_config(init, FLAGS.steps, train_file, eval_file),
          "more_corpus": continued_config(init, FLAGS.steps)}
  pretrain_eval = {}
  for name, config in arms.items():
    print(f"== continued pretraining ({name}, {FLAGS.steps} steps) -> {out}/{name}", flush=True)
    s = train.train_and_evaluate(config, os.path.join(out, name))
    pretrain_eval[name] = {k: v for k, v in (s.last_eval or {}).items()
                           if k.startswith("mlm/")}
  inits = {grid.BASELINE: init, **{n: os.path.join(out, n) for n in arms}}
  runs = []
  for name, path in inits.items():
    base = compare.demo_config(path)
    base.train.epochs = FLAGS.epochs
    try:
      got = grid.run_grid(base, {grid.BASELINE: ""}, seeds, os.path.join(out, "finetune", name))
    except grid.Preempted as e:
      print(f"{e}", file=sys.stderr, flush=True)
      sys.exit(128 + e.signal)
    runs += [dataclasses.replace(r, trick=name) for r in got]
  labels = {n: f"init {p}" for n, p in inits.items()}
  main_metric = base.task.main_metric
  rows = grid.report(runs, labels, main_metric)
  table = grid.markdown(rows, main_metric, what="continued pretraining")
  figure = grid.plot(rows, main_metric, os.path.join(out, "continued.png"))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"runs": [dataclasses.asdict(r) for r in runs], "inits": inits,
               "steps": FLAGS.steps, "seeds": seeds, "pretrain_eval": pretrain_eval},
              f, indent=2)
  print(table + f"\nfigure: {figure}", flush=True)


if __name__ == "__main__":
  errors.run(main)
