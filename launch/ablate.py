r"""Run an ablation grid of pretraining objectives under one budget.

  python -m launch.ablate --config configs/ablate.py:default --workdir runs/ablate

Re-running the same command resumes: finished cells are skipped.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging as absl_logging

import configs
from launch import config_cli, errors

DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "ablate.py") + ":default"
FLAGS = flags.FLAGS
config_cli.define_config(DEFAULT_CONFIG, "Ablation config and name.")
flags.DEFINE_string("workdir", None, "Output directory of the ablation.", required=True)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bert_jax import ablate
  results = ablate.run_ablation(FLAGS.config, FLAGS.workdir)
  print(open(os.path.join(FLAGS.workdir, "results.md")).read())
  failed = [r.name for r in results if r.status == "failed"]
  if failed:
    print(f"failed cells: {failed} (see {FLAGS.workdir}/cells/<name>/failed.json)")


if __name__ == "__main__":
  errors.run(main)
