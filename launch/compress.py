r"""Compress a fine-tuned workdir: int8 (PTQ), QAT, attention heads or layers pruned.

  python -m launch.compress --workdir runs/ft_bundled --out runs/ft_int8 --method int8
      --method qat | heads:0.3 | layers:2,5 | layers:top:2 | layers:alternate:2
      [--finetune_epochs 1]  (pruned models: fine-tune again after pruning)

Writes OUT as a fine-tuned workdir (an init for launch.finetune, exportable with
launch.export_hf) with OUT/compression.json, and prints the dev score beside the
original's. A bad method or workdir: one message, exit status 2. See docs/compression.md.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A fine-tuned workdir (launch.finetune's).", required=True)
flags.DEFINE_string("out", None, "Where the compressed workdir goes.", required=True)
flags.DEFINE_string("method", None, "int8 | qat | heads:F | layers:SPEC", required=True)
flags.DEFINE_integer("calibration_batches", 8, "int8: training batches for the activation "
                     "scales.")
flags.DEFINE_integer("importance_batches", 16, "heads: training batches for the head "
                     "importance.")
flags.DEFINE_float("finetune_epochs", 0.0, "heads/layers: fine-tune the pruned model again "
                   "for this many epochs (0: one-shot).")
flags.DEFINE_integer("seed", None, "Seed of any fine-tuning (default: the run's).")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bert_jax.compress import run
  try:
    method = run.parse_method(FLAGS.method)
    rec = run.compress(FLAGS.workdir, FLAGS.out, method,
                       calibration_batches=FLAGS.calibration_batches,
                       importance_batches=FLAGS.importance_batches,
                       finetune_epochs=FLAGS.finetune_epochs, seed=FLAGS.seed, quiet=False)
  except run.CompressError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(run.report(rec) + f"\nworkdir      {FLAGS.out}", flush=True)


if __name__ == "__main__":
  app.run(main)
