r"""The README's main job: pretrain the tiny BERT on the bundled corpus, then fine-tune it.

  python -m launch.demo [--workdir runs/demo] [--steps N]

Trains the tokenizer if needed, pretrains (resuming if the workdir has a run), evaluates
and prints where the checkpoint, metrics and loss plot are. When the fine-tuning module is
present it then fine-tunes the checkpoint on the bundled task and prints the dev score next
to the same model trained from random initialisation.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging as absl_logging

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/demo", "Where the demo's runs go.")
flags.DEFINE_integer("steps", None, "Pretraining steps (default: the bert,tiny preset's).")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bert_jax import train
  from configs.pretrain import get_config

  config = get_config("bert,tiny")
  if FLAGS.steps is not None:
    config.train.steps = FLAGS.steps
  pretrain_dir = os.path.join(FLAGS.workdir, "pretrain")
  print(f"== pretraining bert,tiny on the bundled KJV corpus -> {pretrain_dir}", flush=True)
  summary = train.train_and_evaluate(config, pretrain_dir)
  print(f"checkpoints  {summary.checkpoint_dir}\nmetrics      {summary.metrics_file}\n"
        f"loss plot    {summary.plot}\nthroughput   {summary.tokens_per_second:,.0f} tokens/s")
  if summary.first_eval and summary.last_eval:
    for k in sorted(k for k in summary.last_eval if k.endswith(("/loss", "/accuracy"))):
      print(f"eval {k:<14s} {summary.first_eval[k]:.4f} (step 0) -> "
            f"{summary.last_eval[k]:.4f} (step {summary.steps})")
  from bert_jax import finetune
  finetune.demo(pretrain_dir, os.path.join(FLAGS.workdir, "finetune"))


if __name__ == "__main__":
  errors.run(main)
