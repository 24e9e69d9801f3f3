r"""Pretrain an encoder.

  python -m launch.pretrain --config configs/pretrain.py:bert,tiny --workdir runs/bert_tiny \
      [--config.train.steps=1000 --config.objectives=mlm:1.0 ...]

Launching the same command on an existing workdir resumes it. Exit codes: 0 done, 2 a
user mistake (one message; --verbose for the traceback), 1 a fault of the run (a checkpoint
that cannot be written or read, non-finite losses), 128 + N after signal N (SIGTERM: 143)
once the checkpoint is written.
"""

from __future__ import annotations

import os
import sys

from absl import logging as absl_logging

from absl import flags

import configs
from launch import config_cli, errors

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "pretrain.py") + ":bert,tiny"
config_cli.define_config(DEFAULT_CONFIG,
                         "Config file and preset, e.g. configs/pretrain.py:bert,tiny.")
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, plots.",
                    required=True)
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0 (or set by the cluster environment).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def initialize_distributed() -> None:
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  initialize_distributed()
  from bert_jax import train
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  lines = [f"workdir      {summary.workdir}",
           f"checkpoints  {summary.checkpoint_dir}",
           f"metrics      {summary.metrics_file} (TensorBoard: {summary.workdir}/tensorboard)",
           f"loss plot    {summary.plot}",
           f"throughput   {summary.tokens_per_second:,.0f} tokens/s"]
  if summary.first_eval and summary.last_eval:
    for k in sorted(summary.last_eval):
      if k.endswith(("loss", "accuracy")):
        lines.append(f"eval {k:<20s} {summary.first_eval.get(k, float('nan')):.4f} -> "
                     f"{summary.last_eval[k]:.4f}")
  elif summary.last_eval:
    lines += [f"eval {k:<20s} {v:.4f}" for k, v in sorted(summary.last_eval.items())]
  print("\n".join(lines), flush=True)
  if summary.signal:  # preempted: checkpointed, not done; a scheduler must not read "done"
    sys.exit(128 + summary.signal)


if __name__ == "__main__":
  errors.run(main)
