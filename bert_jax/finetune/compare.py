"""The README's last step: the pretrained checkpoint against the same model from random
initialisation, fine-tuned alike on the bundled task; both dev scores side by side."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections


def demo_config(pretrain_workdir: str, **overrides: Any) -> ml_collections.ConfigDict:
  """configs/finetune.py:bundled with init = the pretraining workdir (small-CPU settings)."""
  from configs.finetune import get_config
  c = get_config("bundled")
  c.init = pretrain_workdir
  c.data.seq_len = 64
  c.train.update(dict(batch_size=32, eval_batch_size=128, epochs=2.0, log_every=50))
  c.optim.lr = 3e-4
  for key, value in overrides.items():
    section, _, field = key.partition("__")
    if field:
      c[section][field] = value
    else:
      c[section] = value
  return c


def demo(pretrain_workdir: str, out_dir: str, **overrides: Any) -> dict[str, Any]:
  """Fine-tunes `pretrain_workdir`'s checkpoint and the same architecture from random
  weights (same config and seed) on the bundled task; prints and returns both dev scores
  and writes them to out_dir/demo_results.json."""
  from bert_jax.compile_cache import use_compilation_cache
  from bert_jax.finetune.loop import finetune

  # Both runs compile the same steps: the second one reads them from this cache.
  use_compilation_cache(os.path.join(out_dir, "jax_cache"))
  config = demo_config(pretrain_workdir, **overrides)
  baseline = ml_collections.ConfigDict(config.to_dict())
  baseline.init_weights = False
  baseline.lock()
  runs = {}
  t0 = time.perf_counter()
  for name, cfg in (("pretrained", config), ("random_init", baseline)):
    print(f"== fine-tuning on the bundled task ({name}) -> {os.path.join(out_dir, name)}",
          flush=True)
    s = finetune(cfg, os.path.join(out_dir, name))
    runs[name] = {"dev": s.best, "best_step": s.best_step, "steps": s.steps,
                  "init": s.init, "workdir": s.workdir, "seconds": round(s.elapsed_s, 1)}
  main = config.task.main_metric
  keys = [k for k in ("accuracy", "macro_f1", "loss") if k in runs["pretrained"]["dev"]]
  lines = [f"bundled task: dev scores at the best dev {main}",
           f"{'':<14s}" + "".join(f"{k:>12s}" for k in keys)]
  for name in runs:
    lines.append(f"{name:<14s}" + "".join(f"{runs[name]['dev'][k]:>12.4f}" for k in keys))
  p, r = runs["pretrained"]["dev"][main], runs["random_init"]["dev"][main]
  lines.append(f"pretraining gains {p - r:+.4f} {main} ({p:.4f} vs {r:.4f})")
  print("\n".join(lines), flush=True)
  result = {"task": "bundled", "main_metric": main, "pretrained": runs["pretrained"],
            "random_init": runs["random_init"], "gain": p - r,
            "seconds": round(time.perf_counter() - t0, 1),
            "config": json.loads(config.to_json_best_effort())}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "demo_results.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
