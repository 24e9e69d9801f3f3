r"""Evaluate a pretraining workdir's checkpoint on more held-out batches than its run did.

  python -m launch.evaluate --workdir runs/short/mlm_sdp [--batches 99] [--dupe_factor 8] \
      [--step N | --which best]

Prints the held-out examples' description (their count; label_fractions for
sentence-level objectives, whose largest is the chance level) and the held-out metrics of
every objective of the run, computed as the run computes them (same masks, same order of
batches). `--dupe_factor K` draws the held-out examples
K times from the held-out text: the bundled validation split holds a few hundred
sentence pairs, too few to tell 0.39 from chance (docs/objectives.md).
"""

from __future__ import annotations

import logging

from absl import flags

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A bert-jax pretraining workdir.", required=True)
flags.DEFINE_integer("batches", None, "Held-out batches (default: the run's eval_batches).")
flags.DEFINE_integer("dupe_factor", None, "Draws of the held-out examples (default: the "
                     "run's data.dupe_factor).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest, or see --which).")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint when --step is not given.")


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  from bert_jax import train
  step, scores, held_out = train.evaluate_checkpoint(FLAGS.workdir, FLAGS.step, FLAGS.which,
                                                     FLAGS.batches, FLAGS.dupe_factor)
  print(f"{FLAGS.workdir} step {step}")
  for line in held_out:
    print(f"  {line}")
  for k, v in sorted(scores.items()):
    print(f"  {k:28s} {v:.4f}")


if __name__ == "__main__":
  errors.run(main)
