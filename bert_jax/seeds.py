"""Scores over seeds: a mean with its 95% Student-t interval, and a paired comparison with a
baseline run on the same seeds (the paired t-test of scipy.stats), whose verdict is
"noise" when the interval of the difference holds 0."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Interval:
  mean: float
  sd: float
  n: int
  low: float  # 95% t interval of the mean (nan with fewer than 2 values)
  high: float

  def __str__(self) -> str:
    if math.isnan(self.mean):
      return "–"
    if self.n < 2:
      return f"{self.mean:.4f} (n=1)"
    return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def interval(values: Sequence[float], level: float = 0.95) -> Interval:
  a = np.asarray([v for v in values if not math.isnan(v)], np.float64)
  if not len(a):
    return Interval(math.nan, math.nan, 0, math.nan, math.nan)
  mean = float(a.mean())
  if len(a) < 2:
    return Interval(mean, math.nan, 1, math.nan, math.nan)
  sd = float(a.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, len(a) - 1)) * sd / math.sqrt(len(a))
  return Interval(mean, sd, len(a), mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class Paired:
  difference: Interval  # of (treatment - baseline) over the shared seeds
  p_value: float  # two-sided paired t-test
  verdict: str  # better | worse | noise (the interval holds 0) | n/a (fewer than 2 pairs)


def paired(treatment: dict[int, float], baseline: dict[int, float],
           higher_is_better: bool = True) -> Paired:
  """Seed -> score of both; only the seeds both ran are compared."""
  seeds = sorted(set(treatment) & set(baseline))
  t = np.asarray([treatment[s] for s in seeds], np.float64)
  b = np.asarray([baseline[s] for s in seeds], np.float64)
  diff = interval(list(t - b))
  if diff.n < 2:
    return Paired(diff, math.nan, "n/a")
  if np.allclose(t - b, (t - b)[0]):  # a constant difference: the t statistic is undefined
    p = 0.0 if abs(diff.mean) > 0 else 1.0
  else:
    p = float(stats.ttest_rel(t, b).pvalue)
  if diff.low <= 0 <= diff.high:
    verdict = "noise"
  else:
    verdict = "better" if (diff.mean > 0) == higher_is_better else "worse"
  return Paired(diff, p, verdict)
