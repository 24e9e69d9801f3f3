"""Fine-tuning runs through pretraining's loop (train.run): SIGKILL and relaunch resume
bit-identically, the NaN policy stops before a checkpoint of a poisoned state, and SIGTERM
checkpoints the current step."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import metrics as metrics_lib
from bert_jax import run_config, train
from bert_jax.finetune import loop
from tests.conftest import REPO, times_logged
from tests.test_finetune_run import ft_config, preset_workdir
from tests.test_reliability import ENV, assert_same_params, logged_rows


@pytest.fixture(scope="module")
def init_workdir(tmp_path_factory, bundled_tokenizer):
  """A step-0 pretraining checkpoint of the tiny bert preset (random values, no compile)."""
  path = str(tmp_path_factory.mktemp("init") / "bert")
  preset_workdir("bert", bundled_tokenizer, path)
  return path


def finetune_command(config, workdir) -> list[str]:
  """`python -m launch.finetune` running exactly `config`: a flag for every field that
  differs from the bundled preset."""
  from configs.finetune import get_config
  base = run_config.flatten(get_config("bundled"))
  return [sys.executable, "-m", "launch.finetune", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in run_config.flatten(config).items()
            if base.get(k) != v)]


def train_rows(workdir):
  return [r for r in metrics_lib.read_metrics(str(workdir)) if r["split"] == "train"]


def ckpt_steps(workdir, sub="checkpoints"):
  d = os.path.join(str(workdir), sub)
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


def test_sigkill_and_relaunch_resume_bit_identically(init_workdir, tmp_path):
  # Dropout on, best checkpoint and early-stopping count kept: all must resume exactly.
  c = ft_config(init_workdir, steps=8, eval_every=2, patience=3)
  c.model.update(dict(hidden_dropout=0.1, classifier_dropout=0.1))
  reference = tmp_path / "reference"
  ref = loop.finetune(c, str(reference), quiet=True)
  assert ref.steps == 8 and ckpt_steps(reference) == [8]

  wd, rng = tmp_path / "run", np.random.default_rng(11)
  cmd = finetune_command(c, wd)
  # SIGKILL just after a seeded-random step past checkpoint 2, then after step 6 (past
  # checkpoint 4 or 6): each relaunch restores the newest checkpoint and its progress.
  plan = [int(rng.integers(3, 5)), 6]
  kills = []
  with open(tmp_path / "log.txt", "w") as log:
    for step in plan:
      logged = len(train_rows(wd))
      proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
      deadline = time.monotonic() + 300
      while not any(r["step"] >= step for r in train_rows(wd)[logged:]):
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"step {step} not logged within 300 s"
        time.sleep(0.005)
      time.sleep(rng.uniform(0, 0.02))
      proc.kill()
      proc.wait()
      kills.append((step, max(r["step"] for r in train_rows(wd)), ckpt_steps(wd)))
  assert ckpt_steps(wd) and ckpt_steps(wd)[-1] < 8, kills
  s = loop.finetune(c, str(wd), quiet=True)  # the last relaunch runs to the end
  got, want = logged_rows(wd), logged_rows(reference)
  assert sorted(got) == sorted(want)
  for key, rows in got.items():
    assert all(r == want[key][0] for r in rows), (key, rows, want[key])
  assert any(len(rows) > 1 for rows in got.values()), kills  # some steps were redone
  assert_same_params(wd, str(reference), step=8)
  # The best dev checkpoint, its predictions and the bookkeeping match too.
  a, step_a = checkpoint_lib.restore_params(str(wd / loop.BEST_DIR))
  b, step_b = checkpoint_lib.restore_params(str(reference / loop.BEST_DIR))
  assert step_a == step_b == ref.best_step
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert (s.steps, s.best_step, s.best, s.last, s.stopped_early) == (
      ref.steps, ref.best_step, ref.best, ref.last, ref.stopped_early)
  for name in (loop.PREDICTIONS_FILE, loop.PROGRESS_FILE):
    assert (wd / name).read_text() == (reference / name).read_text(), name


def poison(monkeypatch, from_step: int):
  """Makes the task's loss NaN from state step `from_step` (0-based) on."""
  real = train.compute_loss

  def poisoned(params, setup, batch, key, deterministic):
    loss, metrics = real(params, setup, batch, key, deterministic)
    nan = jnp.where(batch["clean"]["step"][0] >= from_step, jnp.nan, 1.0)
    metrics["task/loss"] = (metrics["task/loss"][0] * nan, metrics["task/loss"][1])
    return loss * nan, dict(metrics, loss=(metrics["loss"][0] * nan, metrics["loss"][1]))

  monkeypatch.setattr(train, "compute_loss", poisoned)


def test_nan_stop_keeps_the_last_checkpoint(init_workdir, tmp_path, monkeypatch):
  c = ft_config(init_workdir, steps=4, eval_every=2)
  wd = str(tmp_path / "ft")
  loop.finetune(c, wd, quiet=True, stop_after=2)
  before, step = checkpoint_lib.restore_params(wd)
  assert step == 2
  best_before = ckpt_steps(wd, loop.BEST_DIR)
  poison(monkeypatch, from_step=2)  # steps 3, 4 are non-finite
  with pytest.raises(train.NonFiniteError, match=r"step 3 \(from task"):
    loop.finetune(c, wd, quiet=True)
  after, step = checkpoint_lib.restore_params(wd)
  assert step == 2 and ckpt_steps(wd) == [2]  # no checkpoint of the poisoned state
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt_steps(wd, loop.BEST_DIR) == best_before
  assert max(r["step"] for r in train_rows(wd)) == 2  # the poisoned step was not logged
  # skip: the non-finite steps' updates are dropped and counted; the run completes.
  c.train.nan_policy = "skip"
  s = loop.finetune(c, wd, quiet=True)
  assert s.steps == 4
  last = [r for r in train_rows(wd) if r["step"] == 4][-1]
  assert last["nonfinite_steps"] > 0


def test_sigterm_checkpoints_the_current_step_and_relaunch_resumes(init_workdir, tmp_path):
  # Evaluations (and so checkpoints) only at the end: a checkpoint comes from SIGTERM alone.
  c = ft_config(init_workdir, steps=100000, eval_every=100000)
  wd = tmp_path / "ft"
  proc = subprocess.Popen(finetune_command(c, wd), cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not any(r["step"] >= 3 for r in train_rows(wd)):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != -signal.SIGTERM, out[-3000:]  # handled, not killed by it
  assert "checkpointed step" in out, out[-3000:]
  steps = ckpt_steps(wd)
  assert len(steps) == 1 and steps[0] >= 3
  saved = steps[0]
  assert max(r["step"] for r in train_rows(wd)) == saved
  with open(wd / "config.json") as f:
    assert json.load(f)["train"]["nan_policy"] == "stop"
  s = loop.finetune(c, str(wd), quiet=True, stop_after=saved + 2)
  assert s.steps == saved + 2 and ckpt_steps(wd) == [saved + 2]
  # Resumed from the SIGTERM checkpoint: no step logged twice, none skipped.
  assert times_logged(str(wd)) == {k: 1 for k in range(1, saved + 3)}
