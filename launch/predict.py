r"""Predict on new data with a fine-tuned workdir, or fill in [MASK]s with a pretraining one.

  python -m launch.predict --workdir runs/ft_bundled --input new.jsonl --out preds.jsonl \
      [--which best|latest --batch_size 64]
  python -m launch.predict --workdir runs/bert_tiny --input masked.txt --out filled.jsonl \
      --top_k 5

The input is CSV, TSV or JSONL (optionally .gz) with the fields the workdir's config.task
names (text_key, text_pair_key, tokens_key, question_key, context_key, choices_key), or
plain text with one example per line (a text; for tagging, whitespace-split words; for
fill-mask, a line with [MASK]s). OUT gets one JSON row per example, in input order. A bad
row or workdir: one `error:` line naming it, exit status 2. See docs/finetune.md.
"""

from __future__ import annotations

import warnings

from absl import flags
from absl import logging as absl_logging

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A fine-tuned workdir (launch.finetune) or a "
                    "pretraining one with an MLM head (launch.pretrain: fill-mask).",
                    required=True)
flags.DEFINE_string("input", None, "CSV, TSV, JSONL or plain-text file of examples.",
                    required=True)
flags.DEFINE_string("out", None, "Where the predictions go (JSONL).", required=True)
flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint: the best (by dev score; "
                  "pretraining: by eval loss) or the latest.")
flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
flags.DEFINE_integer("top_k", None, "Fill-mask: tokens per [MASK] (default 5).")


def main(argv):
  del argv
  # The output is the file: orbax's notes on a read-only, params-only restore are noise.
  absl_logging.set_verbosity(absl_logging.ERROR)
  warnings.filterwarnings("ignore", message="Sharding info not provided", category=UserWarning)
  from bert_jax.finetune import predict
  r = predict.predict_file(FLAGS.workdir, FLAGS.input, FLAGS.out, which=FLAGS.which,
                           batch_size=FLAGS.batch_size, top_k=FLAGS.top_k, progress=True)
  print("\n".join([f"workdir      {r.workdir} ({r.which} checkpoint, step {r.step})",
                   f"task         {r.kind}",
                   f"predictions  {r.out} ({len(r.rows):,} rows)"]), flush=True)


if __name__ == "__main__":
  errors.run(main)
