"""Seed statistics (bert_jax/seeds.py) against hand-computed figures, and a tiny real
tricks grid (bert_jax/finetune/grid.py): runs, resume, report and refusal of bad tricks."""

import math
import os

import numpy as np
import pytest

from bert_jax import seeds
from bert_jax.finetune import grid
from tests.test_finetune_run import ft_config, pretrained  # noqa: F401  (a fixture)


def test_interval_and_paired_against_hand_computed_figures():
  iv = seeds.interval([1.0, 2.0, 3.0, 4.0, 5.0])
  # sd = sqrt(2.5); t_{0.975, 4} = 2.776445 (tables); half = t sd / sqrt(5)
  half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
  assert iv.n == 5 and iv.mean == 3.0
  np.testing.assert_allclose([iv.low, iv.high], [3 - half, 3 + half], rtol=1e-5)
  base = {0: 0.30, 1: 0.32, 2: 0.31, 3: 0.29}
  better = {0: 0.35, 1: 0.38, 2: 0.36, 3: 0.33}  # differences .05 .06 .05 .04
  p = seeds.paired(better, base)
  d = np.array([0.05, 0.06, 0.05, 0.04])
  t = d.mean() / (d.std(ddof=1) / 2)  # t = 7.07 on 3 degrees of freedom
  assert p.verdict == "better" and p.difference.low > 0
  np.testing.assert_allclose(p.difference.mean, 0.05, rtol=1e-9)
  assert t > 5.841 and p.p_value < 0.01  # t_{0.995, 3} = 5.841: p below 0.01
  noisy = {0: 0.33, 1: 0.30, 2: 0.32, 3: 0.28}  # differences .03 -.02 .01 -.01
  assert seeds.paired(noisy, base).verdict == "noise"
  assert seeds.paired({0: 0.1}, base).verdict == "n/a"  # one shared seed: no interval
  assert seeds.paired(better, base, higher_is_better=False).verdict == "worse"


def test_a_tiny_grid_runs_resumes_and_reports(pretrained, tmp_path):
  base = ft_config(pretrained, steps=2, eval_every=2)
  tricks = {"baseline": "", "fgm": "adversarial.mode=fgm;adversarial.epsilon=0.5"}
  with pytest.raises(ValueError, match="adversarial.nope"):
    grid.run_grid(base, {"baseline": "", "bad": "adversarial.nope=1"}, [0], str(tmp_path))
  runs = grid.run_grid(base, tricks, [0, 1], str(tmp_path), log=lambda s: None)
  assert [(r.trick, r.seed) for r in runs] == [("baseline", 0), ("baseline", 1), ("fgm", 0),
                                               ("fgm", 1)]
  assert all(r.steps == 2 for r in runs)
  # The FGM runs trained with the adversarial term (their logged loss holds it).
  from bert_jax import metrics as metrics_lib
  rows = [r for r in metrics_lib.read_metrics(os.path.join(str(tmp_path), "fgm", "s0"))
          if r["split"] == "train"]
  assert rows and all("adversarial_loss" in r for r in rows)
  started = []
  again = grid.run_grid(base, tricks, [0, 1], str(tmp_path), log=started.append)
  assert not started and [r.score for r in again] == [r.score for r in runs]  # resumed
  report = grid.report(runs, tricks, "accuracy")
  assert report[0]["trick"] == "baseline" and "paired" not in report[0]
  assert report[1]["paired"].verdict in ("better", "worse", "noise")
  table = grid.markdown(report, "accuracy")
  assert "| fgm |" in table and "paired t p" in table
  assert os.path.getsize(grid.plot(report, "accuracy", str(tmp_path / "t.png"))) > 1000
