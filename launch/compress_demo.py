r"""docs/compression.md's table: one pretrained encoder, fine-tuned with 3 seeds on the
bundled task, each compressed every way; prints and writes ROOT/summary.json.

  python -m launch.compress_demo --pretrain runs/c6/pretrain --root runs/c6 [--epochs 1]

Fine-tuning is launch.demo's recipe (configs/finetune.py:bundled, lr 3e-4, batch 32,
length 64) for `--epochs`. Per seed: int8 PTQ, heads 30% / 50% (one-shot), QAT (the same
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
  for s in seeds:
    ft = os.path.join(root, f"ft_s{s}")
    if not os.path.isfile(os.path.join(ft, "results.json")):
      c = demo_config(os.path.abspath(FLAGS.pretrain), train__epochs=FLAGS.epochs)
      c.seed = s
      print(f"== fine-tuning seed {s} -> {ft}", flush=True)
      finetune(c, ft, quiet=True)
    with open(os.path.join(ft, "results.json")) as f:
      summary.setdefault("fp32", {})[str(s)] = json.load(f)["best"]
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
  print(json.dumps({k: {s: round(v[s]["dev"]["accuracy"] if "dev" in v[s] else
                                 v[s]["accuracy"], 4) for s in v}
                    for k, v in summary.items()}, indent=1), flush=True)


if __name__ == "__main__":
  app.run(main)
