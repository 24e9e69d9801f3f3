r"""Compare fine-tuning tricks with a baseline from one pretrained checkpoint, over seeds.

  python -m launch.finetune_tricks --init runs/demo/pretrain --out runs/tricks \
      [--tricks baseline,fgm,ema] [--seeds 0,1,2,3,4] [--epochs 1] \
      [--config.optim.lr=3e-4 ...]

The tricks are configs/finetune.py's TRICKS (overrides of one config: the bundled task at
launch.demo's recipe, `--config.*` changing it for all). Each (trick, seed) is a
fine-tuning workdir OUT/<trick>/s<seed>; relaunching resumes the grid. Writes
OUT/results.md (mean and 95% interval per trick, the paired difference with the baseline
and its verdict: "noise" where the interval holds 0), OUT/results.json and OUT/tricks.png.
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
flags.DEFINE_string("init", None, "The pretraining workdir every run starts from.",
                    required=True)
flags.DEFINE_string("out", None, "Where the runs and the report go.", required=True)
flags.DEFINE_string("tricks", "", "Comma-separated names of configs/finetune.py TRICKS "
                    "(default: all); the baseline is always run.")
flags.DEFINE_string("seeds", "0,1,2,3,4", "Comma-separated seeds (each trick and the "
                    "baseline run every one: paired comparisons).")
flags.DEFINE_float("epochs", 1.0, "Fine-tuning epochs of every run.")
flags.DEFINE_multi_string("config", [], "Overrides for every run, e.g. optim.lr=3e-4 "
                          "(as --config=optim.lr=3e-4).")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from configs.finetune import TRICKS
  from bert_jax import ablate
  from bert_jax.compile_cache import use_compilation_cache
  from bert_jax.finetune import compare, grid

  names = [t.strip() for t in FLAGS.tricks.split(",") if t.strip()] or list(TRICKS)
  unknown = sorted(set(names) - set(TRICKS))
  if unknown:
    errors.fail(f"--tricks: unknown {unknown}; available: {', '.join(TRICKS)}")
  seeds = errors.seeds(FLAGS.seeds)
  tricks = {grid.BASELINE: TRICKS[grid.BASELINE]}
  tricks.update({n: TRICKS[n] for n in names})
  base = compare.demo_config(os.path.abspath(FLAGS.init))
  base.train.epochs = FLAGS.epochs
  ablate.apply_overrides(base, ";".join(FLAGS.config))
  os.makedirs(FLAGS.out, exist_ok=True)
  use_compilation_cache(os.path.join(FLAGS.out, "jax_cache"))
  try:
    runs = grid.run_grid(base, tricks, seeds, FLAGS.out)
  except grid.Preempted as e:
    print(f"{e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signal)
  main_metric = base.task.main_metric
  rows = grid.report(runs, tricks, main_metric)
  table = grid.markdown(rows, main_metric)
  figure = grid.plot(rows, main_metric, os.path.join(FLAGS.out, "tricks.png"))
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump({"runs": [dataclasses.asdict(r) for r in runs], "tricks": tricks,
               "seeds": seeds, "base": json.loads(base.to_json_best_effort())}, f, indent=2)
  print(table + f"\nfigure: {figure}", flush=True)


if __name__ == "__main__":
  errors.run(main)
