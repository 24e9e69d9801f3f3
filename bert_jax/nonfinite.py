"""The limit on skipped non-finite steps (train.nan_policy=skip).

With `skip` a step whose loss or gradient is not finite leaves the parameters and the
optimizer state unchanged; `train/nonfinite_steps` in the metrics is the number of such
steps in each logging interval. Beyond `train.max_nonfinite_steps` skipped steps over the
whole run (relaunches included: the earlier count is read back from metrics.jsonl) the
run stops with TooManyNonFiniteSteps. -1 means no limit.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from bert_jax import metrics as metrics_lib

DEFAULT_MAX_NONFINITE_STEPS = 10


class TooManyNonFiniteSteps(FloatingPointError):
  """More skipped non-finite steps than train.max_nonfinite_steps."""


def _earlier_count(workdir: str, start: int) -> int:
  """Skipped steps logged up to `start` by earlier launches (each step's latest row)."""
  rows = metrics_lib.latest_rows(metrics_lib.read_metrics(workdir))
  total = 0.0
  for r in rows:
    if r["split"] == "train" and r["step"] <= start:
      value = r.get("nonfinite_steps", 0.0)
      if isinstance(value, (int, float)) and math.isfinite(value):
        total += value
  return int(round(total))


class Guard:
  """Counts skipped steps at each logging step; raises past the limit (policy "skip")."""

  def __init__(self, train_cfg: Any, start: int, workdir: str):
    self.policy = train_cfg.get("nan_policy", "stop")
    limit = train_cfg.get("max_nonfinite_steps")
    self.limit = DEFAULT_MAX_NONFINITE_STEPS if limit is None else int(limit)
    self.total = _earlier_count(workdir, start) if self.policy == "skip" and start else 0

  def update(self, step: int, values: Mapping[str, float]) -> None:
    count = values.get("nonfinite_steps", 0.0)
    if self.policy != "skip" or not count:
      return
    self.total += int(round(count))
    if self.limit >= 0 and self.total > self.limit:
      raise TooManyNonFiniteSteps(
          f"{self.total} steps had a non-finite loss or gradient by step {step} (their "
          f"updates were skipped), more than train.max_nonfinite_steps={self.limit}; the "
          "checkpoints never hold a skipped update. Lower the learning rate (or use bfloat16 less "
          "aggressively), or raise --config.train.max_nonfinite_steps (-1: no limit).")
