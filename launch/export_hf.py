r"""Export a bert-jax checkpoint (imported or pretrained by us) as a transformers directory.

  python -m launch.export_hf --workdir runs/bert_tiny --out exported/bert_tiny [--step N]

Writes OUT/config.json, OUT/model.safetensors and the tokenizer (the imported one, or a
tokenizer.json converted from WORKDIR/tokenizer.model). `--heads auto` picks the richest
transformers class the checkpoint's heads fill (e.g. BertForPreTraining with MLM + NSP,
BertForMaskedLM with MLM alone); `--heads none` writes the encoder (and pooler) alone.
`--tower generator` writes an ELECTRA run's generator as an ElectraForMaskedLM.
See docs/interop.md.
"""

from __future__ import annotations

import logging

from absl import flags

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A bert-jax workdir with checkpoints.", required=True)
flags.DEFINE_string("out", None, "Output directory for transformers.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest, or see --which).")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "Checkpoint when --step is not given.")
flags.DEFINE_enum("tower", "discriminator", ["discriminator", "generator"],
                  "RTD (ELECTRA) runs: export the encoder (discriminator) or the generator "
                  "as an ElectraForMaskedLM.")
flags.DEFINE_string("heads", "auto", "auto | none | a transformers class name, e.g. "
                    "BertForMaskedLM.")


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  from bert_jax import hf
  s = hf.export_from_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.which, FLAGS.heads,
                             tower=FLAGS.tower)
  print(f"exported     {FLAGS.workdir} step {s['step']} (family {s['family']})\n"
        f"to           {s['out_dir']} as {s['architecture']}\n"
        f"tokenizer    {', '.join(s['tokenizer']) or 'none'}\n"
        f"load with    transformers.{s['architecture']}.from_pretrained({s['out_dir']!r})",
        flush=True)
  if s["skipped"]:
    print(f"not exported {', '.join(s['skipped'])} (no transformers counterpart)")


if __name__ == "__main__":
  errors.run(main)
