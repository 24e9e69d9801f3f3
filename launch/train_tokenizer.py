r"""Train a sentencepiece tokenizer with bert-jax's special-token layout.

  python -m launch.train_tokenizer --source bundled --out runs/tok
  python -m launch.train_tokenizer --source text --files 'corpus/*.txt.gz' --out runs/tok \
      --vocab_size 32000 --model_type unigram [--text_format sentences]

Writes OUT/tokenizer.model and OUT/tokenizer.vocab; point a run at it with
``--config.data.tokenizer=OUT/tokenizer.model``. Special ids: [PAD]=0, [UNK]=1, [CLS]=2,
[SEP]=3, [MASK]=4.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags

from launch import errors

FLAGS = flags.FLAGS
flags.DEFINE_enum("source", "bundled", ["bundled", "text"], "Where the training text comes from.")
flags.DEFINE_string("files", "", "--source=text: comma-separated globs of text files.")
flags.DEFINE_enum("text_format", "sentences", ["sentences", "lines", "plain"],
                  "--source=text: layout of the files (see bert_jax.data.sources).")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("vocab_size", 8000, "Number of pieces, specials included (soft limit).")
flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe", "char", "word"],
                  "Sentencepiece model type.")
flags.DEFINE_integer("max_sentences", 0,
                     "Train on at most this many sentences, evenly spaced (0: all).")
flags.DEFINE_integer("seed", 0, "Sentencepiece random seed.")


def main(argv):
  del argv
  from bert_jax.data import sources, tokenizer

  if FLAGS.source == "text" and not FLAGS.files:
    raise app.UsageError("--source=text needs --files.")
  data_cfg = ml_collections.ConfigDict(dict(
      source=FLAGS.source, train_files=FLAGS.files, eval_files="",
      text_format=FLAGS.text_format, train_split="train", eval_split=""))
  docs = sources.load_documents(data_cfg, "train")
  path = tokenizer.train_tokenizer(
      (s for doc in docs.documents for s in doc), FLAGS.out,
      vocab_size=FLAGS.vocab_size, model_type=FLAGS.model_type, seed=FLAGS.seed,
      max_sentences=FLAGS.max_sentences or None)
  tok = tokenizer.load_tokenizer(path)
  s = docs.stats
  print(f"read     {s.description}: {s.documents} documents, {s.sentences} sentences, "
        f"{s.skipped_non_utf8} non-UTF-8 lines skipped")
  print(f"wrote    {path} ({tok.vocab_size} pieces)")
  print(f"use with --config.data.tokenizer={path}")


if __name__ == "__main__":
  errors.run(main)
