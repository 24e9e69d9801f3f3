r"""Fine-tune a pretrained encoder on a downstream task.

  python -m launch.finetune --config configs/finetune.py:bundled \
      --config.init=runs/demo/pretrain --workdir runs/ft_bundled \
      [--config.init_which=best --config.optim.layer_decay=0.8 ...]

TASK is a preset of configs/finetune.py (bundled, sst2, cola, ..., squad_v1, squad_v2,
conll2003, hellaswag, swag, files). --config.init="" fine-tunes from random weights (the
baseline). Launching the same command on an existing workdir resumes it.
"""

from __future__ import annotations

import sys

from absl import flags
from absl import logging as absl_logging

from launch import config_cli, errors

FLAGS = flags.FLAGS
config_cli.define_config("configs/finetune.py:bundled",
                         "Config file and task, e.g. configs/finetune.py:sst2.")
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, "
                    "predictions.", required=True)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bert_jax.finetune import finetune
  s = finetune(FLAGS.config, FLAGS.workdir)
  lines = [f"workdir      {s.workdir}",
           f"init         {s.init}",
           f"steps        {s.steps}{' (stopped early)' if s.stopped_early else ''}",
           f"best step    {s.best_step} (by dev {s.main_metric})",
           f"predictions  {s.predictions_file}"]
  lines += [f"dev {k:<16s} {v:.4f}" for k, v in sorted(s.best.items())]
  print("\n".join(lines), flush=True)
  if s.signal:  # preempted: checkpointed, not done; a scheduler must not read "done"
    sys.exit(128 + s.signal)


if __name__ == "__main__":
  errors.run(main)
