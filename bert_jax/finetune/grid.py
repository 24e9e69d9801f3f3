"""Fine-tuning tricks against a baseline from one pretrained checkpoint, over seeds.

Every (trick, seed) is one fine-tuning workdir, OUT/<trick>/s<seed>, run by the one loop;
a workdir with its results.json is done and is read back, so an interrupted grid resumes
where it stopped. The report gives each trick's dev score (mean and 95% interval), its
paired difference with the baseline on the same seeds (interval, paired t-test, and
"noise" where the interval holds 0), and the wall time per run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import ml_collections

from bert_jax import ablate, seeds as seeds_lib
from bert_jax.finetune import loop, scores as scores_lib

BASELINE = "baseline"


class Preempted(Exception):
  def __init__(self, signal: int, workdir: str):
    super().__init__(f"signal {signal} stopped {workdir} after a checkpoint; relaunch the "
                     "same command to resume the grid")
    self.signal = signal


@dataclasses.dataclass
class Run:
  trick: str
  seed: int
  score: float
  seconds: float
  steps: int


def trick_config(base: ml_collections.ConfigDict, overrides: str,
                 seed: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(base.to_dict())
  ablate.apply_overrides(c, overrides)
  c.seed = seed
  c.lock()
  return c


def run_grid(base: ml_collections.ConfigDict, tricks: dict[str, str], seeds: Sequence[int],
             out: str, finetune: Callable = loop.finetune,
             log: Callable[[str], None] = print) -> list[Run]:
  """Fine-tunes every trick with every seed (the baseline too), resuming done runs."""
  unknown = [f for f in tricks.values() if f and not _valid(base, f)]
  if unknown:  # refused before any run starts
    raise ValueError(f"trick overrides {unknown} name fields the config does not have")
  main = base.task.main_metric
  runs = []
  for i, (name, overrides) in enumerate(tricks.items()):
    for seed in seeds:
      wd = os.path.join(out, name, f"s{seed}")
      done = os.path.join(wd, loop.RESULTS_FILE)
      if os.path.exists(done):
        with open(done) as f:
          r = json.load(f)
        if not r.get("signal"):  # a run a signal stopped is not done: resumed below
          runs.append(Run(name, seed, r["best"][main], r["elapsed_s"], r["steps"]))
          continue
      log(f"== [{i + 1}/{len(tricks)}] {name} seed {seed} -> {wd}")
      t0 = time.perf_counter()
      s = finetune(trick_config(base, overrides, seed), wd, quiet=True)
      if s.signal:  # preempted (checkpointed): the grid stops; relaunching resumes it
        raise Preempted(s.signal, wd)
      runs.append(Run(name, seed, s.best[main], time.perf_counter() - t0, s.steps))
      log(f"   {main}={s.best[main]:.4f} ({runs[-1].seconds:.0f} s)")
  return runs


def _valid(base, overrides: str) -> bool:
  try:
    ablate.apply_overrides(ml_collections.ConfigDict(base.to_dict()), overrides)
    return True
  except (ValueError, KeyError, AttributeError):
    return False


def report(runs: Sequence[Run], tricks: dict[str, str], main: str) -> list[dict[str, Any]]:
  """One row per trick: its interval, the paired difference with the baseline, time."""
  higher = main not in scores_lib.LOWER_IS_BETTER
  by = {t: {r.seed: r.score for r in runs if r.trick == t} for t in tricks}
  rows = []
  for t in tricks:
    row = {"trick": t, "overrides": tricks[t], "score": seeds_lib.interval(list(by[t].values())),
           "seconds": sum(r.seconds for r in runs if r.trick == t) / max(len(by[t]), 1),
           "seeds": sorted(by[t]), "scores": [by[t][s] for s in sorted(by[t])]}
    if t != BASELINE and BASELINE in by:
      row["paired"] = seeds_lib.paired(by[t], by[BASELINE], higher)
    rows.append(row)
  return rows


def markdown(rows: list[dict[str, Any]], main: str, what: str = "trick") -> str:
  lines = [f"| {what} | dev {main}: mean [95% CI] | vs baseline: difference [95% CI] | "
           "paired t p | verdict | s / run | overrides |", "|---|---|---|---|---|---:|---|"]
  for r in rows:
    p = r.get("paired")
    diff = (f"{p.difference.mean:+.4f} [{p.difference.low:+.4f}, {p.difference.high:+.4f}]"
            if p and p.difference.n > 1 else "–")
    lines.append(f"| {r['trick']} | {r['score']} (n={r['score'].n}) | {diff} | "
                 f"{f'{p.p_value:.3f}' if p else '–'} | {p.verdict if p else '–'} | "
                 f"{r['seconds']:.0f} | `{r['overrides'] or '(none)'}` |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], main: str, path: str) -> str:
  """Each trick's seeds as dots and its 95% interval as a bar, the baseline's as a band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
  for i, r in enumerate(rows):
    iv = r["score"]
    ax.scatter(r["scores"], [i] * len(r["scores"]), s=12, color="0.5", zorder=3)
    if iv.n > 1:
      ax.plot([iv.low, iv.high], [i, i], color="C0", lw=3, zorder=2)
    ax.plot([iv.mean], [i], "o", color="C0" if r["trick"] != BASELINE else "C3", zorder=4)
    if r["trick"] == BASELINE and iv.n > 1:
      ax.axvspan(iv.low, iv.high, color="C3", alpha=0.12)
  ax.set_yticks(range(len(rows)), [r["trick"] for r in rows])
  ax.invert_yaxis()
  ax.set_xlabel(f"dev {main} (dots: seeds; bar: 95% CI; band: the baseline's)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
