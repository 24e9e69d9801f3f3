r"""Benchmark of the prepared-data path (docs/data.md has the figures).

  python -m launch.benchmark_data --out /tmp/bench_data --scales 1,10,100 \
      [--seq_len 128 --batch 256 --batches 200 --workers 1,2 --throughput_scale 10]

1. Corpus: the bundled training corpus repeated N times, the documents shuffled in each
   copy, written as text files of --file_mb MB (``corpus-Nx/*.txt``).
2. Preparation: ``launch.prepare_data``'s pipeline (bert,tiny: MLM + NSP pairs) on each
   corpus with the DirectRunner (multi_processing) and --workers workers; MB of text/s.
3. Reading: for each prepared corpus, a fresh process builds the training iterator
   (``--config.data.prepared``), reads --batches global batches of --batch examples and
   reports its peak RSS and the tokens/s it delivers (seq_len x batch per batch, and the
   real, unpadded tokens).

Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/bench_data", "Working directory (corpora, prepared data).")
flags.DEFINE_list("scales", ["1", "10", "100"], "Corpus sizes, in copies of the bundled corpus.")
flags.DEFINE_list("workers", ["1", "2"], "DirectRunner worker counts for the throughput run.")
flags.DEFINE_integer("throughput_scale", 10, "Corpus (in copies) the worker counts are timed on.")
flags.DEFINE_float("file_mb", 8.0, "Size of each corpus text file.")
flags.DEFINE_float("shard_mb", 8.0, "Input shard size of the preparation.")
flags.DEFINE_integer("seq_len", 128, "Example length.")
flags.DEFINE_integer("batch", 256, "Global batch of the reader.")
flags.DEFINE_integer("batches", 200, "Batches the reader reads (after 10 warm-up batches).")
flags.DEFINE_integer("threads", 0, "Reader threads (data.num_threads; 0: the default).")
flags.DEFINE_string("objectives", "mlm:1.0,nsp:1.0", "Objectives (decide the example kind).")
flags.DEFINE_string("tokenizer", "", "Tokenizer (default: one trained on the bundled corpus).")
flags.DEFINE_string("mode", "all", "all | read (one reader measurement: internal).")
flags.DEFINE_string("prepared", "", "mode=read: the prepared directory.")


def _config(tokenizer: str, **data):
  from configs.pretrain import get_config
  c = get_config("bert,tiny")
  c.objectives = FLAGS.objectives
  c.data.update(dict(seq_len=FLAGS.seq_len, tokenizer=tokenizer, **data))
  return c


def make_corpus(root: pathlib.Path, copies: int) -> pathlib.Path:
  """The bundled train corpus x copies, documents shuffled per copy, in files of file_mb."""
  from bert_jax.data import bundled
  out = root / f"corpus-{copies}x"
  if (out / "DONE").is_file():
    return out
  out.mkdir(parents=True, exist_ok=True)
  docs, _ = bundled.read_documents(bundled.corpus_path("train"))
  texts = ["\n".join(d) + "\n\n" for d in docs]
  rng = random.Random(copies)
  limit = int(FLAGS.file_mb * (1 << 20))
  n_file, size, f = 0, 0, None
  for _ in range(copies):
    order = list(range(len(texts)))
    rng.shuffle(order)
    for i in order:
      if f is None or size >= limit:
        if f:
          f.close()
        f = open(out / f"part-{n_file:05d}.txt", "w", encoding="utf-8")
        n_file, size = n_file + 1, 0
      size += f.write(texts[i])
  f.close()
  (out / "DONE").write_text("")
  return out


def prepare(corpus: pathlib.Path, out: pathlib.Path, tokenizer: str, workers: int) -> dict:
  from bert_jax.data import prepare as prepare_lib
  config = _config(tokenizer, source="text", train_files=f"{corpus}/*.txt",
                   eval_files=f"{corpus}/part-00000.txt")
  options = prepare_lib.pipeline_options(num_workers=workers, running_mode="multi_processing")
  t0 = time.perf_counter()
  m = prepare_lib.prepare(config, out, splits=("train",),
                          shard_bytes=int(FLAGS.shard_mb * (1 << 20)), options=options,
                          log=lambda s: print(s, file=sys.stderr))
  seconds = time.perf_counter() - t0
  info = m["splits"]["train"]
  return {"what": "prepare", "corpus": corpus.name, "workers": workers,
          "text_mb": info["text_bytes"] / 1e6, "seconds": round(seconds, 2),
          "mb_per_s": round(info["text_bytes"] / 1e6 / seconds, 3),
          "mb_per_cpu_s": round(info["text_bytes"] / 1e6 / max(info["cpu_seconds"], 1e-9), 3),
          "examples": info["examples"], "shards": len(info["shards"]),
          "prepared_mb": round(sum(s["bytes"] for s in info["shards"]) / 1e6, 1)}


def _vm(field: str) -> float:
  """A /proc/self/status field (VmRSS, VmHWM) in MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def read_once() -> None:
  """mode=read: one fresh process; prints a JSON line."""
  import resource
  import numpy as np
  from bert_jax.data import pipeline, tokenizer as tokenizer_lib
  from bert_jax.data import arrayrecord
  import objectives
  from bert_jax import train

  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss_start = _vm("VmRSS")
  config = _config(FLAGS.tokenizer, prepared=FLAGS.prepared)
  tok = tokenizer_lib.load_tokenizer(FLAGS.tokenizer)
  kind = objectives.build(config, train.special_ids(tok)).example_kind
  ds = pipeline.build_dataset(config.data, tok, "train", seed=0, example_kind=kind,
                              workdir=FLAGS.out, global_batch_size=FLAGS.batch)
  it = pipeline.train_iterator(ds, batch_size_per_host=FLAGS.batch, seed=0,
                               num_threads=FLAGS.threads)
  for _ in range(10):
    next(it)
  real = 0
  t0 = time.perf_counter()
  for _ in range(FLAGS.batches):
    b = next(it)
    real += int(b["attention_mask"].sum())
  seconds = time.perf_counter() - t0
  state = it.get_state()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  m = arrayrecord.read_manifest(FLAGS.prepared)["splits"]["train"]
  print("RESULT " + json.dumps({
      "what": "read", "prepared": FLAGS.prepared, "examples": len(ds),
      "text_mb": round(m["text_bytes"] / 1e6, 1), "batches": FLAGS.batches,
      "peak_rss_mb": round(rss / 1024, 1), "rss_after_imports_mb": round(rss0 / 1024, 1),
      "rss_before_dataset_mb": round(rss_start, 1), "rss_after_reading_mb": round(_vm("VmRSS"), 1),
      "tokens_per_s": round(FLAGS.batches * FLAGS.batch * FLAGS.seq_len / seconds),
      "real_tokens_per_s": round(real / seconds),
      "examples_per_s": round(FLAGS.batches * FLAGS.batch / seconds),
      "state_bytes": len(json.dumps(state, default=str))}), flush=True)
  del np


def main(argv):
  del argv
  if FLAGS.mode == "read":
    return read_once()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  root = pathlib.Path(FLAGS.out)
  root.mkdir(parents=True, exist_ok=True)
  tokenizer = FLAGS.tokenizer
  if not tokenizer:
    from bert_jax.data import bundled, tokenizer as tokenizer_lib
    tokenizer = str(root / "tok" / "tokenizer.model")
    if not os.path.isfile(tokenizer):
      docs, _ = bundled.read_documents(bundled.corpus_path("train"))
      tokenizer_lib.train_tokenizer((s for d in docs for s in d), root / "tok",
                                    vocab_size=8000, max_sentences=20000)
  results = []

  def emit(r):
    results.append(r)
    print(json.dumps(r), flush=True)

  scales = [int(s) for s in FLAGS.scales]
  for w in (int(x) for x in FLAGS.workers):
    corpus = make_corpus(root, FLAGS.throughput_scale)
    out = root / f"prepared-{FLAGS.throughput_scale}x-w{w}"
    if out.exists():
      subprocess.run(["rm", "-rf", str(out)], check=True)
    emit(prepare(corpus, out, tokenizer, w))
  workers = max(int(x) for x in FLAGS.workers)
  for s in scales:
    out = root / f"prepared-{s}x-w{workers}"
    if not (out / "manifest.json").is_file():
      emit(prepare(make_corpus(root, s), out, tokenizer, workers))
  for s in scales:
    out = root / f"prepared-{s}x-w{workers}"
    cmd = [sys.executable, "-m", "launch.benchmark_data", "--mode=read", f"--prepared={out}",
           f"--tokenizer={tokenizer}", f"--seq_len={FLAGS.seq_len}", f"--batch={FLAGS.batch}",
           f"--batches={FLAGS.batches}", f"--threads={FLAGS.threads}",
           f"--objectives={FLAGS.objectives}", f"--out={root}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    emit(json.loads(line[len("RESULT "):]))
  reads = [r for r in results if r["what"] == "read"]
  if reads:
    peaks = [r["peak_rss_mb"] for r in reads]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    print(f"reader peak RSS {', '.join(f'{p:.0f}' for p in peaks)} MB over scales "
          f"{FLAGS.scales}: spread {spread:.1%}")
  with open(os.path.join(root, "results.jsonl"), "a") as f:
    for r in results:
      f.write(json.dumps({**r, "time": time.strftime("%Y-%m-%d %H:%M"),
                          "loadavg": os.getloadavg()}) + "\n")


if __name__ == "__main__":
  app.run(main)
