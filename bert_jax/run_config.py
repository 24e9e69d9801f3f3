"""The run's resolved config in its workdir, and the checks made before any compute.

`validate(config)` checks values no launcher should accept (negative steps or objective
weights, unknown policies); `check_compatible` compares with the workdir's config.json;
`record_validated` writes config.json and the tokenizer's fingerprint only once the run
has passed every start-up check (a rejected config never poisons its workdir);
`check_tokenizer` refuses a resume whose tokenizer differs from the recorded one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import ml_collections

CONFIG_FILE = "config.json"
TOKENIZER_RECORD = "tokenizer_fingerprint.json"

# Fields that may change when a run is resumed (longer runs, other logging); any other
# difference means the workdir holds a different experiment.
RESUMABLE_PREFIXES = ("train.steps", "train.log_every", "train.eval_every",
                      "train.eval_batches", "train.checkpoint_every", "train.keep",
                      "train.keep_best", "train.async_checkpoint", "data.num_threads",
                      "data.cache_dir", "mesh.", "sharding.", "model.remat",
                      "model.attention_impl", "train.nan_policy",
                      "train.max_nonfinite_steps", "train.restart_if_unreadable",
                      "train.allow_schedule_change")


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


class ConfigError(ValueError):
  """A config value no run accepts (a user mistake: the launchers exit with code 2)."""


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks of values alone, before anything is built (pretraining and fine-tuning)."""
  tc = config.get("train")
  if tc is not None:
    if tc.get("steps") is not None and tc.steps < 0:
      raise ConfigError(f"train.steps must be >= 0, got {tc.steps}")
    if tc.get("max_nonfinite_steps") is not None and tc.max_nonfinite_steps < -1:
      raise ConfigError(f"train.max_nonfinite_steps must be >= 0 (or -1: no limit), got "
                        f"{tc.max_nonfinite_steps}")
  if isinstance(config.get("objectives"), str):
    import objectives as objectives_lib
    for name, weight in objectives_lib.parse_spec(config.objectives):
      if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"objectives: the weight of {name!r} is {weight:g} in "
                          f"{config.objectives!r}; weights must be finite and >= 0 "
                          "(e.g. --config.objectives=mlm:1.0,sop:1.0)")


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _schedule_change(old: dict[str, Any], config: ml_collections.ConfigDict,
                     workdir: str) -> None:
  """train.steps sets the learning-rate schedule's length: changing it on resume re-shapes
  the schedule from the resumed step on. Refused unless train.allow_schedule_change."""
  new_steps, old_steps = config.train.get("steps"), old.get("train.steps")
  steps = checkpoint_steps(workdir)
  if old_steps is None or new_steps == old_steps or not steps:
    return
  resumed = steps[-1]
  detail = ""
  try:
    from bert_jax import optim
    if config.get("optim") is not None and "lr" in config.optim and "warmup_steps" in config.optim \
        and config.optim.warmup_steps >= 0:
      a = float(optim.learning_rate(config.optim, old_steps)(resumed))
      b = float(optim.learning_rate(config.optim, new_steps)(resumed))
      detail = f" (learning rate at step {resumed}: {a:.3g} -> {b:.3g})"
  except Exception:  # noqa: BLE001  (a detail of the message only)
    detail = ""
  message = (f"train.steps changes from {old_steps} to {new_steps} on resume (workdir "
             f"{workdir}, checkpoint {resumed}): the learning-rate schedule, whose warmup "
             f"and decay run over train.steps, is re-shaped from step {resumed} on{detail}")
  if config.train.get("allow_schedule_change"):
    logging.warning("%s (train.allow_schedule_change=True)", message)
    print(f"warning: {message} (train.allow_schedule_change=True)", file=sys.stderr,
          flush=True)
    return
  raise ConfigError(f"{message}. Relaunch with --config.train.allow_schedule_change=True to "
                    f"accept that, or keep --config.train.steps={old_steps}.")


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises if the workdir holds a run whose config differs in a non-resumable field."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = flatten(json.load(f))
  new = flatten(json.loads(config.to_json_best_effort()))
  # A field absent from the workdir's config did not exist when its run began (a newer
  # version's option): not a difference.
  diffs = [k for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_PREFIXES)
           and k in old]
  if diffs:
    detail = "; ".join(f"{k}: {old.get(k)!r} in the workdir, {new.get(k)!r} now"
                       for k in diffs[:8])
    raise ConfigError(f"workdir {workdir!r} holds a run with an incompatible config "
                      f"({detail}). Use a new --workdir, or the same settings to resume.")
  if config.get("train") is not None:
    _schedule_change(old, config, workdir)


def check_tokenizer(workdir: str, tokenizer: Any) -> None:
  """Refuses a tokenizer other than the one recorded at the workdir's first launch."""
  path = os.path.join(workdir, TOKENIZER_RECORD)
  if not os.path.exists(path):
    return
  with open(path) as f:
    recorded = json.load(f)
  if recorded.get("fingerprint") != tokenizer.fingerprint:
    raise ConfigError(
        f"the tokenizer differs from the one this workdir's run was started with: "
        f"{getattr(tokenizer, 'path', '?')} has fingerprint {tokenizer.fingerprint}, the run "
        f"recorded {recorded.get('fingerprint')} ({recorded.get('path')}, vocabulary "
        f"{recorded.get('vocab_size')}) in {path}. Its checkpoints are trained on that "
        "tokenizer's ids: put it back, or use a new --workdir.")


def record_validated(config: ml_collections.ConfigDict, workdir: str,
                     tokenizer: Any | None = None) -> None:
  """Writes config.json (and, the first time, the tokenizer's fingerprint): called once the
  run has passed its start-up checks, so a rejected config leaves nothing behind."""
  import jax
  if jax.process_index() != 0:
    return
  save(config, workdir)
  path = os.path.join(workdir, TOKENIZER_RECORD)
  if tokenizer is not None and not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump({"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                 "path": str(getattr(tokenizer, "path", ""))}, f, indent=2)
    os.replace(tmp, path)
