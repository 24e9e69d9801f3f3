"""The run's resolved config in its workdir, and the checks made before any compute."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"

# Fields that may change when a run is resumed (longer runs, other logging); any other
# difference means the workdir holds a different experiment.
RESUMABLE_PREFIXES = ("train.steps", "train.log_every", "train.eval_every",
                      "train.eval_batches", "train.checkpoint_every", "train.keep",
                      "train.keep_best", "train.async_checkpoint", "data.num_threads",
                      "data.cache_dir", "mesh.", "sharding.", "model.remat",
                      "model.attention_impl", "train.nan_policy")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, ml_collections.ConfigDict):
    d = d.to_dict()
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def save(config: ml_collections.ConfigDict, workdir: str) -> str:
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)  # atomic: a crash never leaves half a config
  return path


def load(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(json.load(f))


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises if the workdir holds a run whose config differs in a non-resumable field."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = flatten(json.load(f))
  new = flatten(json.loads(config.to_json_best_effort()))
  diffs = [k for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_PREFIXES)]
  if diffs:
    detail = "; ".join(f"{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now"
                       for k in diffs[:8])
    raise ValueError(f"workdir {workdir!r} holds a run with an incompatible config ({detail}). "
                     "Use a new --workdir, or the same settings to resume.")
