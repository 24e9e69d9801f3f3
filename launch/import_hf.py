r"""Import a Hugging Face (transformers, PyTorch) checkpoint into a bert-jax workdir.

  python -m launch.import_hf --hf_dir path/to/bert-base-uncased --workdir runs/bert_base_hf
  python -m launch.import_hf --hf_dir electra-small-discriminator \
      --generator_dir electra-small-generator --workdir runs/electra_small_hf

Writes WORKDIR/config.json (a full run config, family and model from the checkpoint),
an orbax checkpoint at step 0 in WORKDIR/checkpoints (parameters of the encoder and the
pretraining heads the checkpoint has), and the tokenizer files under WORKDIR/hf/ (a
sentencepiece model also as WORKDIR/tokenizer.model). Supported model types: albert,
bert, distilbert, electra, mobilebert, roberta, xlnet. See docs/interop.md.
"""

from __future__ import annotations

import logging

from absl import flags

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "A transformers model directory (config.json + "
                    "model.safetensors or pytorch_model.bin).", required=True)
flags.DEFINE_string("workdir", None, "The new bert-jax workdir.", required=True)
flags.DEFINE_string("generator_dir", None, "ELECTRA: the generator (ElectraForMaskedLM) of "
                    "the discriminator in --hf_dir; both go into one tree of the rtd "
                    "objective's layout (params['rtd']['generator'], ...).")
flags.DEFINE_enum("size", "tiny", ["tiny", "small", "base"],
                  "Preset whose training fields (batch, steps, lr) the config starts from.")


def main(argv):
  del argv
  logging.getLogger("absl").setLevel(logging.WARNING)
  from bert_jax import hf
  summary = hf.import_to_workdir(FLAGS.hf_dir, FLAGS.workdir, size=FLAGS.size,
                                 generator_dir=FLAGS.generator_dir)
  cfg = summary["config"]
  print(f"imported     {FLAGS.hf_dir} ({summary['architecture']}, family {summary['family']})\n"
        f"model        {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}\n"
        f"heads        {', '.join(summary['heads']) or 'none'}\n"
        f"tokenizer    {', '.join(summary['tokenizer']) or 'none found'}\n"
        f"workdir      {summary['workdir']} (checkpoint at step 0)", flush=True)
  if summary["generator"]:
    g = summary["generator"]
    print(f"generator    {FLAGS.generator_dir}: {g.num_layers} layers, hidden {g.hidden_size} "
          "(shares the embedding tables)")
  if summary["ignored"]:
    print(f"ignored      {len(summary['ignored'])} weights: {', '.join(summary['ignored'][:8])}")


if __name__ == "__main__":
  errors.run(main)
