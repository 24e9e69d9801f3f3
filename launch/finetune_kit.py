r"""K-fold cross-validation, ensembles and pseudo-labels for classification and regression.

  python -m launch.finetune_kit --mode kfold --out runs/cv --k 5 \
      --config configs/finetune.py:bundled --config.init=runs/demo/pretrain [--config.* ...]
  python -m launch.finetune_kit --mode ensemble --out runs/ens \
      --workdirs runs/cv/fold0,runs/cv/fold1,runs/cv/fold2 [--input dev.jsonl]
  python -m launch.finetune_kit --mode pseudo --out runs/pseudo --workdir runs/ft_bundled \
      --input unlabelled.jsonl --threshold 0.9

kfold: OUT/fold<k> per fold (relaunching resumes), OUT/oof_predictions.jsonl, OUT/cv.json.
ensemble: the mean of the members' probabilities (or outputs) on the first member's dev
split or --input: OUT/ensemble_predictions.jsonl, OUT/ensemble.json. pseudo: the teacher
--workdir labels --input, rows with max probability >= --threshold join its training set
for a new run OUT/run: OUT/pseudo.json. --config applies to kfold (ensemble and pseudo
read their workdirs' configs). A bad input: one `error:` line, exit status 2. See
docs/finetune.md.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

from absl import flags
from absl import logging as absl_logging

from launch import config_cli, errors

MODES = ("kfold", "ensemble", "pseudo")

FLAGS = flags.FLAGS
config_cli.define_config("configs/finetune.py:bundled",
                         "kfold: the fine-tuning config, e.g. configs/finetune.py:sst2.")
flags.DEFINE_enum("mode", None, list(MODES), "What to run.", required=True)
flags.DEFINE_string("out", None, "Where the runs and the report go.", required=True)
flags.DEFINE_integer("k", 5, "kfold: the number of folds.")
flags.DEFINE_string("workdirs", "", "ensemble: comma-separated fine-tuned workdirs of one "
                    "task.")
flags.DEFINE_string("workdir", "", "pseudo: the fine-tuned workdir that labels --input.")
flags.DEFINE_string("input", "", "ensemble: rows to predict (default: the first member's "
                    "dev split); pseudo: the unlabelled rows (CSV, TSV, JSONL or text).")
flags.DEFINE_float("threshold", 0.9, "pseudo: keep rows whose largest class probability "
                   "is at least this.")
flags.DEFINE_enum("which", "best", ["best", "latest"], "ensemble, pseudo: the checkpoint "
                  "of each workdir.")
flags.DEFINE_integer("batch_size", 64, "ensemble, pseudo: examples per prediction batch.")


def _fmt(scores: dict[str, float]) -> str:
  return ", ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items())) or "(no labels)"


def kfold() -> None:
  from bert_jax.finetune import kfold as kfold_lib
  cv = kfold_lib.run_kfold(FLAGS.config, FLAGS.k, FLAGS.out)
  lines = [f"fold {f['fold']}: {f['n_train']} train / {f['n_dev']} held out, "
           f"{cv.main_metric}={f['score']:.4f}" for f in cv.folds]
  sd = "" if math.isnan(cv.sd) else f" ± {cv.sd:.4f} (sd)"
  lines += [f"folds        {cv.main_metric} {cv.mean:.4f}{sd} over {cv.k} folds",
            f"CV (out-of-fold) {_fmt(cv.cv)}",
            f"predictions  {os.path.join(cv.out, kfold_lib.OOF_FILE)}"]
  print("\n".join(lines), flush=True)


def ensemble() -> None:
  from bert_jax.finetune import ensemble as ensemble_lib
  workdirs = [w.strip() for w in FLAGS.workdirs.split(",") if w.strip()]
  r = ensemble_lib.ensemble(workdirs, FLAGS.input or None, FLAGS.out, which=FLAGS.which,
                            batch_size=FLAGS.batch_size)
  lines = [f"rows         {r.n} ({r.input})"]
  lines += [f"member       {w}: {_fmt(s)}" for w, s in zip(r.workdirs, r.members)]
  lines += [f"ensemble     {_fmt(r.scores)}",
            f"predictions  {os.path.join(FLAGS.out, ensemble_lib.PREDICTIONS_FILE)}"]
  print("\n".join(lines), flush=True)


def pseudo() -> None:
  from bert_jax.finetune import pseudo as pseudo_lib
  if not FLAGS.workdir or not FLAGS.input:
    errors.fail("--mode pseudo needs --workdir (the teacher) and --input (unlabelled rows)")
  r = pseudo_lib.pseudo_label(FLAGS.workdir, FLAGS.input, FLAGS.out, FLAGS.threshold,
                              which=FLAGS.which, batch_size=FLAGS.batch_size)
  print("\n".join([
      f"kept         {r.kept} of {r.rows} rows (max probability >= {r.threshold})",
      f"train        {r.n_train} + {r.kept} = {r.n_train_new} records",
      f"dev {r.main_metric:<8s} {r.original:.4f} (teacher) -> {r.new:.4f} ({r.workdir})"]),
      flush=True)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  warnings.filterwarnings("ignore", message="Sharding info not provided", category=UserWarning)
  if FLAGS.mode != "kfold" and any(a.startswith("--config") for a in sys.argv[1:]):
    errors.fail(f"--config applies to --mode kfold; --mode {FLAGS.mode} reads the configs "
                "of its workdirs")
  if FLAGS.mode == "kfold" and FLAGS.k < 2:
    errors.fail(f"--k={FLAGS.k}: cross-validation needs at least 2 folds")
  if FLAGS.mode == "ensemble" and len([w for w in FLAGS.workdirs.split(",") if w.strip()]) < 2:
    errors.fail("--mode ensemble needs --workdirs with at least two fine-tuned workdirs")
  from bert_jax.compile_cache import use_compilation_cache
  from bert_jax.finetune import kfold as kfold_lib
  os.makedirs(FLAGS.out, exist_ok=True)
  use_compilation_cache(os.path.join(FLAGS.out, "jax_cache"))
  try:
    {"kfold": kfold, "ensemble": ensemble, "pseudo": pseudo}[FLAGS.mode]()
  except kfold_lib.Preempted as e:  # checkpointed, not done: a scheduler must not read "done"
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signal)


if __name__ == "__main__":
  errors.run(main)
