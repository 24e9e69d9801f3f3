r"""Prepare pretraining examples offline into sharded ArrayRecord files (Apache Beam).

  python -m launch.prepare_data --config configs/pretrain.py:bert,tiny --out data/kjv \
      [--config.data.source=text --config.data.train_files='corpus/*.txt' ...]
  python -m launch.pretrain --config configs/pretrain.py:bert,tiny --workdir runs/x \
      --config.data.prepared=data/kjv

Builds the examples the config's objectives need (single segments or NSP/SOP pairs, with
data.dupe_factor passes for pairs) of data.seq_len tokens, one shard per input shard, plus
OUT/manifest.json and OUT/tokenizer.model. Re-running the same command resumes a killed
job (finished shards are kept). Runs on Beam's DirectRunner with --direct_num_workers local
processes by default; another runner's options go in --beam_options (docs/data.md).
Exit codes: 0 done, 2 a user mistake (one message; --verbose for the traceback).
"""

from __future__ import annotations

import os
import shlex

from absl import flags

import configs
from launch import config_cli, errors

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "pretrain.py") + ":bert,tiny"
config_cli.define_config(DEFAULT_CONFIG,
                         "Config file and preset, e.g. configs/pretrain.py:bert,tiny.")
flags.DEFINE_string("out", None, "Output directory of the prepared data.", required=True)
flags.DEFINE_list("splits", ["train", "eval"], "Splits to prepare.")
flags.DEFINE_string("runner", "DirectRunner", "Beam runner (DirectRunner, DataflowRunner, "
                    "FlinkRunner, SparkRunner, PortableRunner).")
flags.DEFINE_integer("direct_num_workers", 2, "DirectRunner: local worker processes.")
flags.DEFINE_enum("direct_running_mode", "multi_processing",
                  ["in_memory", "multi_threading", "multi_processing"],
                  "DirectRunner: how the workers run.")
flags.DEFINE_string("beam_options", "", "More Beam pipeline options, one string, e.g. "
                    "'--project=P --region=R --temp_location=gs://B/tmp'.")
flags.DEFINE_float("shard_mb", 32.0, "Input shard size: text files are cut into byte ranges "
                   "of this many MB (.gz files are one shard each).")
flags.DEFINE_integer("tfds_docs_per_shard", 20_000, "Input shard size of a tfds source, "
                     "in records.")


def main(argv):
  del argv
  import logging
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  # apache_beam's import warns that the GCP clients are absent (not needed here).
  logging.getLogger().addFilter(lambda r: "apitools not found" not in r.getMessage())
  from bert_jax.data import prepare

  options = prepare.pipeline_options(FLAGS.runner, FLAGS.direct_num_workers,
                                     FLAGS.direct_running_mode, shlex.split(FLAGS.beam_options))
  manifest = prepare.prepare(FLAGS.config, FLAGS.out, splits=tuple(FLAGS.splits),
                             shard_bytes=int(FLAGS.shard_mb * (1 << 20)),
                             tfds_docs_per_shard=FLAGS.tfds_docs_per_shard, options=options)
  for split, info in manifest["splits"].items():
    mb = info["text_bytes"] / 1e6
    print(f"{split:<6s} {len(info['shards'])} shards, {info['examples']:,} "
          f"{manifest['example_kind']['name']} examples, {info['tokens']:,} tokens, "
          f"{info['documents']:,} documents, {mb:,.1f} MB of text")
  print(f"took   {manifest['prepare_seconds_last_run']:.1f} s; manifest "
        f"{os.path.join(FLAGS.out, 'manifest.json')}; train with "
        f"--config.data.prepared={FLAGS.out}")


if __name__ == "__main__":
  errors.run(main)
