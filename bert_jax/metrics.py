"""Metrics to TensorBoard event files and metrics.jsonl, console progress, loss plots.

Only process 0 writes. Metrics arrive from the step as (sum, count) pairs and are reduced
here to means, so averages over many steps and devices are exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Iterable, Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
# Reduced as totals over the interval, not means: how many steps were skipped.
SUMMED_METRICS = ("nonfinite_steps",)


def reduce_metrics(metrics: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """A list of {name: (sum, count)} (device or host) -> {name: sum/count} as floats."""
  sums: dict[str, float] = {}
  counts: dict[str, float] = {}
  for m in jax.device_get(list(metrics)):
    for k, (s, c) in m.items():
      sums[k] = sums.get(k, 0.0) + float(s)
      counts[k] = counts.get(k, 0.0) + float(c)
  return {k: sums[k] if k in SUMMED_METRICS else
          sums[k] / counts[k] if counts[k] else float("nan") for k in sums}


class MetricWriter:
  """Appends {"step", "split", ...} rows to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      # NaN and inf are written on purpose (a skipped step shows); not a warning each time.
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split, "time": time.time()}
    row.update({k: float(v) for k, v in values.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float)):  # NaN and inf too: TensorBoard shows them as such
        self._tb.add_scalar(f"{split}/{k}", float(v), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
  path = workdir_or_file
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
          continue
  return rows


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """After a resume, steps may be logged twice: keep each (split, step)'s last row."""
  seen: dict[tuple[str, int], dict[str, Any]] = {}
  for r in rows:
    seen[(r["split"], r["step"])] = r
  return sorted(seen.values(), key=lambda r: (r["split"], r["step"]))


def nonfinite_points(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
  """(step, split) of each logged row whose loss is NaN or infinite."""
  return [(r["step"], r["split"]) for r in rows
          if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"])]


def plot_losses(workdir: str, out_name: str = "loss.png") -> str | None:
  """Train and eval loss (and accuracy metrics, if any) against step, as a PNG."""
  rows = latest_rows(read_metrics(workdir))
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  acc_keys = sorted({k for r in rows for k in r if k.endswith("accuracy")})
  ncols = 2 if acc_keys else 1
  fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
  ax = axes[0][0]
  bad = nonfinite_points(rows)
  for split, style in (("train", "-"), ("eval", "o-")):
    pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split and "loss" in r]
    if pts:
      s, v = zip(*pts)
      ax.plot(s, v, style, label=f"{split} loss", markersize=3)
  if bad:  # matplotlib would leave a silent gap: mark each non-finite value at the bottom
    finite = [r["loss"] for r in rows if "loss" in r and math.isfinite(r["loss"])
              and r["loss"] > 0]
    floor = min(finite) if finite else 1.0
    ax.plot([s for s, _ in bad], [floor] * len(bad), "rx", markersize=7,
            label=f"non-finite loss ({len(bad)} logged)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  if acc_keys:
    ax = axes[0][1]
    for k in acc_keys:
      pts = [(r["step"], r[k]) for r in rows if r["split"] == "eval" and k in r]
      if pts:
        s, v = zip(*pts)
        ax.plot(s, v, "o-", label=f"eval {k}", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


class Progress:
  """A tqdm bar over steps with loss, tokens/s and ETA; silent on processes other than 0."""

  def __init__(self, total: int, initial: int, tokens_per_step: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.tokens_per_step = tokens_per_step
    self._bar = None
    self._last = (initial, time.perf_counter())
    if self.enabled:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                       mininterval=1.0, smoothing=0.1)

  def update(self, step: int, loss: float | None = None) -> float:
    """Advance to `step`; returns tokens/s since the previous call."""
    last_step, last_t = self._last
    now = time.perf_counter()
    rate = (step - last_step) * self.tokens_per_step / max(now - last_t, 1e-9)
    self._last = (step, now)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      post = {"tok/s": f"{rate:,.0f}"}
      if loss is not None:
        post["loss"] = f"{loss:.4f}"
      self._bar.set_postfix(post, refresh=False)
    return rate

  def write(self, msg: str) -> None:
    if self._bar is not None:
      self._bar.write(msg)
    elif self.enabled:
      print(msg, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
