r"""docs/compression.md's table: one pretrained encoder, fine-tuned with 3 seeds on the
bundled task, each compressed every way; prints and writes ROOT/summary.json.

  python -m launch.compress_demo --pretrain runs/c6/pretrain --root runs/c6 [--epochs 1 --lr 5e-4]

Fine-tuning is launch.demo's recipe (configs/finetune.py:bundled, batch 32, length 64)
with `--lr` (5e-4) for `--epochs`. Per seed: int8 PTQ, heads 30% / 50% (one-shot), QAT (the same
fine-tuning with quant.mode=qat, then int8), layers top:2 / top:4 dropped then fine-tuned
again for `--epochs`. Seed 0 also gets one-shot layer dropping (no fine-tuning).
Workdirs that are complete are reused, so the command resumes.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from absl import logging as absl_logging

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrain", "runs/c6/pretrain", "Pretraining workdir.")
flags.DEFINE_string("root", "runs/c6", "Where the runs go.")
flags.DEFINE_float("epochs", 1.0, "Fine-tuning epochs (and after layer dropping).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds.")
flags.DEFINE_float("lr", 5e-4, "Fine-tuning learning rate.")
flags.DEFINE_string("distilled", "", "A distilled student's pretraining workdir (e.g. "
                    "distilbert,tiny with --config.distill.teacher=PRETRAIN): fine-tuned "
                    "with the same recipe and seeds, the table's 'distilled' row.")


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from bert_jax.compile_cache import use_compilation_cache
  from bert_jax.compress import run
  from bert_jax.finetune.compare import demo_config
  from bert_jax.finetune.loop import finetune

  root = os.path.abspath(FLAGS.root)
  use_compilation_cache(os.path.join(root, "jax_cache"))
  summary_path = os.path.join(root, "summary.json")
  summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}

  def save():
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=2, sort_keys=True)

  seeds = [int(s) for s in FLAGS.seeds]
  inits = [("fp32", "ft", FLAGS.pretrain)]
  if FLAGS.distilled:
    inits.append(("distilled", "distilled_ft", FLAGS.distilled))
  for row, prefix, pretrain in inits:
    for s in seeds:
      ft = os.path.join(root, f"{prefix}_s{s}")
      if not os.path.isfile(os.path.join(ft, "results.json")):
        c = demo_config(os.path.abspath(pretrain), train__epochs=FLAGS.epochs,
                        optim__lr=FLAGS.lr)
        c.seed = s
        print(f"== fine-tuning {row} seed {s} -> {ft}", flush=True)
        finetune(c, ft, quiet=True)
      with open(os.path.join(ft, "results.json")) as f:
        summary.setdefault(row, {})[str(s)] = json.load(f)["best"]
      save()
  jobs = [("int8", "int8", {}), ("heads:0.3", "heads30", {}), ("heads:0.5", "heads50", {}),
          ("qat", "qat", {}),
          ("layers:top:2", "layers2", {"finetune_epochs": FLAGS.epochs}),
          ("layers:top:4", "layers4", {"finetune_epochs": FLAGS.epochs})]
  extra0 = [("layers:top:2", "layers2_oneshot", {}), ("layers:top:4", "layers4_oneshot", {}),
            ("layers:alternate:2", "layers2alt_oneshot", {})]
  for s in seeds:
    for method, name, kw in jobs + (extra0 if s == seeds[0] else []):
      out = os.path.join(root, f"{name}_s{s}")
      rec_file = os.path.join(out, "compression.json")
      if not os.path.isfile(rec_file):
        print(f"== {method} seed {s} -> {out}", flush=True)
        rec = run.compress(os.path.join(root, f"ft_s{s}"), out, method, seed=s, **kw)
        print(run.report(rec), flush=True)
      with open(rec_file) as f:
        rec = json.load(f)
      summary.setdefault(name, {})[str(s)] = {
          "dev": rec["compressed"]["dev"], "original_dev": rec["original"]["dev"],
          "oneshot_dev": rec.get("oneshot_dev"), "parameters": rec["compressed"]["parameters"],
          "int8_bytes": rec.get("int8_bytes"), "checkpoint_bytes": rec["checkpoint_bytes"],
          "qat_fake_quant_dev": rec.get("qat_fake_quant_dev")}
      save()
  print(table(summary), flush=True)


def table(summary) -> str:
  """Markdown: dev accuracy mean +- sd over seeds (one-shot / QAT fake-quant beside)."""
  import numpy as np

  def acc(d):
    return d["accuracy"] if "accuracy" in d else d["dev"]["accuracy"]

  def ms(values):
    v = np.asarray(values, np.float64)
    return f"{v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:.4f} (n={len(v)})"

  lines = ["| model | dev accuracy | note |", "|---|---|---|"]
  for name, runs in summary.items():
    note = ""
    first = next(iter(runs.values()))
    if name != "fp32" and first.get("oneshot_dev") and name.startswith("layers") and (
        "oneshot" not in name):
      note = "before re-fine-tuning: " + ms([r["oneshot_dev"]["accuracy"]
                                              for r in runs.values()])
    if first.get("qat_fake_quant_dev"):
      note = "QAT run's own dev (fake quant, dynamic scales): " + ms(
          [r["qat_fake_quant_dev"]["accuracy"] for r in runs.values()])
    lines.append(f"| {name} | {ms([acc(r) for r in runs.values()])} | {note} |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
