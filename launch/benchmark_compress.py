r"""Compressed models side by side: dev score, parameters, bytes on disk, CPU latency.

  python -m launch.benchmark_compress --workdirs runs/ft,runs/ft_int8,runs/ft_heads30 \
      [--seq_len 64 --batch_sizes 1,32 --reps 30 --out runs/compress_bench.json]

Each workdir is a fine-tuned one (launch.finetune) or a compressed one (launch.compress;
int8 workdirs run their int8 weights through qwix). Latency: the jitted forward pass of
the task model on a batch of `seq_len` tokens, compiled first, then `reps` rounds that
time every model once each in turn (so that load on a shared machine hits all alike);
the median per model and batch size is reported. Bytes: the best/ checkpoint directory
(float32), and for int8 workdirs the int8 file. Prints a markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

from absl import app, flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Fine-tuned / compressed workdirs.", required=True)
flags.DEFINE_list("names", None, "Row names (default: the workdir names).")
flags.DEFINE_integer("seq_len", 64, "Tokens per example.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
flags.DEFINE_integer("reps", 30, "Timed rounds.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")


def cpu_name() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def load_row(path: str):
  """(apply_fn, params, info) of a workdir's model."""
  import jax
  import numpy as np

  from bert_jax.compress import quantize, workdir as wd
  ft = wd.load_finetuned(path)
  n_out = len(ft.label_names) if ft.label_names else 1
  model = wd.task_model(ft.cfg, ft.config, n_out)
  rec = {}
  if os.path.isfile(os.path.join(path, wd.COMPRESSION_FILE)):
    with open(os.path.join(path, wd.COMPRESSION_FILE)) as f:
      rec = json.load(f)
  info = {"workdir": path, "method": rec.get("method", "fp32"),
          "parameters": wd.count_params(ft.params), "num_layers": ft.cfg.num_layers,
          "heads": sum(ft.cfg.layer_heads(i) for i in range(ft.cfg.num_layers)),
          "bytes_fp32": wd.dir_bytes(os.path.join(path, "best")),
          "dev": ft.scores}
  int8 = os.path.join(path, wd.INT8_FILE)
  if os.path.isfile(int8):
    act = ft.config.quant.act
    ptq = quantize.ptq_model(model, act)
    sample = {"input_ids": np.full((2, 16), 5, np.int32),
              "segment_ids": np.zeros((2, 16), np.int32),
              "attention_mask": np.ones((2, 16), np.int32),
              "example_weight": np.ones((2,), np.float32), "label": np.zeros((2,), np.int32)}
    abstract = jax.eval_shape(lambda: ptq.init({"params": jax.random.PRNGKey(0)}, sample,
                                               deterministic=True))["params"]
    params = quantize.load(int8, abstract)
    info["bytes_int8"] = os.path.getsize(int8)
    return (lambda p, b: ptq.apply({"params": p}, b, deterministic=True)["task"]), params, info
  params = jax.tree.map(jax.numpy.asarray, ft.params)
  return wd.float_apply(model), params, info


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax
  import numpy as np

  names = FLAGS.names or [os.path.basename(os.path.normpath(w)) for w in FLAGS.workdirs]
  rows = [load_row(w) for w in FLAGS.workdirs]
  sizes = [int(b) for b in FLAGS.batch_sizes]
  rng = np.random.default_rng(0)
  batches = {b: {"input_ids": rng.integers(5, 500, (b, FLAGS.seq_len)).astype(np.int32),
                 "segment_ids": np.zeros((b, FLAGS.seq_len), np.int32),
                 "attention_mask": np.ones((b, FLAGS.seq_len), np.int32),
                 "example_weight": np.ones((b,), np.float32),
                 "label": np.zeros((b,), np.int32)} for b in sizes}
  fns = []
  for apply_fn, params, _ in rows:
    f = jax.jit(apply_fn)
    for b in sizes:
      jax.block_until_ready(f(params, batches[b]))  # compile
    fns.append((f, params))
  times = {(i, b): [] for i in range(len(rows)) for b in sizes}
  for _ in range(FLAGS.reps):
    for b in sizes:
      for i, (f, params) in enumerate(fns):
        t0 = time.perf_counter()
        jax.block_until_ready(f(params, batches[b]))
        times[(i, b)].append(time.perf_counter() - t0)
  results = []
  for i, (_, _, info) in enumerate(rows):
    r = dict(info, name=names[i])
    for b in sizes:
      r[f"latency_ms_b{b}"] = float(np.median(times[(i, b)]) * 1e3)
    results.append(r)
  meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(),
          "cores": os.cpu_count(), "jax": jax.__version__, "seq_len": FLAGS.seq_len,
          "reps": FLAGS.reps, "backend": jax.default_backend()}
  head = ["model", "layers", "heads", "parameters", "bytes"] + [f"ms @ batch {b}" for b in sizes]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    size = f"{r['bytes_fp32']:,}" + (f" (int8 file {r['bytes_int8']:,})" if "bytes_int8" in r
                                     else "")
    lines.append("| " + " | ".join([r["name"], str(r["num_layers"]), str(r["heads"]),
                                    f"{r['parameters']:,}", size]
                                   + [f"{r[f'latency_ms_b{b}']:.2f}" for b in sizes]) + " |")
  print(f"{meta['date']}, {meta['cpu']} ({meta['cores']} cores), jax {meta['jax']}, "
        f"seq_len {FLAGS.seq_len}, median of {FLAGS.reps}")
  print("\n".join(lines), flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"meta": meta, "rows": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
