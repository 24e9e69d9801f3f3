"""Faults injected into the loop: non-finite losses (stop / skip) and preemption."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import train
from tests.conftest import tiny_config, train_losses
from tests.test_train import SPECIAL, random_batch


def poison(monkeypatch, when=lambda batch: True):
  """Makes the MLM loss NaN for batches where `when(batch)` holds (traced)."""
  real = train.compute_loss

  def poisoned(params, setup, batch, key, deterministic):
    loss, metrics = real(params, setup, batch, key, deterministic)
    bad = when(batch)
    nan = jnp.where(bad, jnp.nan, 1.0)
    metrics["mlm/loss"] = (metrics["mlm/loss"][0] * nan, metrics["mlm/loss"][1])
    return loss * nan, dict(metrics, loss=(metrics["loss"][0] * nan, metrics["loss"][1]))

  monkeypatch.setattr(train, "compute_loss", poisoned)


def test_skip_policy_drops_the_update(monkeypatch):
  poison(monkeypatch)
  c = tiny_config("unused", train__nan_policy="skip")
  setup = train.build_setup(c, SPECIAL)
  state = train._init_boxed(setup, 0, train.dummy_batch(16, 64, "single"))
  import flax.linen as nn
  state = nn.meta.unbox(state)
  batch = jax.tree.map(jnp.asarray, random_batch(0))
  new, m = jax.jit(lambda s, b: train.train_step(s, b, setup))(state, batch)
  assert float(m["nonfinite_steps"][0]) == 1.0
  assert int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stop_policy_names_step_and_objective_and_keeps_checkpoint(
    monkeypatch, tmp_path, bundled_tokenizer):
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), train__steps=4,
                  train__checkpoint_every=2)
  wd = str(tmp_path / "w")
  train.train_and_evaluate(c, wd, stop_after=2)
  params_before, step = checkpoint_lib.restore_params(wd)
  assert step == 2
  poison(monkeypatch)
  with pytest.raises(train.NonFiniteError, match=r"step 3 \(from mlm"):
    train.train_and_evaluate(c, wd)
  params_after, step = checkpoint_lib.restore_params(wd)
  assert step == 2  # no checkpoint of the poisoned state
  for a, b in zip(jax.tree.leaves(params_after), jax.tree.leaves(params_before)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))


def test_damaged_checkpoint_is_skipped_and_run_continues_identically(tmp_path, reference_run):
  config, reference = reference_run
  wd = tmp_path / "w"
  train.train_and_evaluate(config, str(wd), stop_after=4)
  # Damage checkpoint 4: truncate every file of its parameter state.
  damaged = 0
  for root, _, files in os.walk(wd / "checkpoints" / "4" / "state"):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 16:
        with open(path, "r+b") as f:
          f.truncate(size // 3)
        damaged += 1
  assert damaged
  train.train_and_evaluate(config, str(wd))  # resumes from 2, with a warning
  assert list((wd / "checkpoints_unreadable").iterdir())
  a, b = train_losses(reference), train_losses(wd)
  assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


def test_sigterm_checkpoints_before_exit(tmp_path, bundled_tokenizer):
  import signal
  import subprocess
  import sys
  import time

  from tests.conftest import REPO
  wd = tmp_path / "run"
  args = [sys.executable, "-m", "launch.pretrain", f"--workdir={wd}",
          "--config.objectives=mlm:1.0", "--config.model.vocab_size=512",
          "--config.model.hidden_size=32", "--config.model.num_heads=4",
          "--config.model.intermediate_size=64", f"--config.data.tokenizer={bundled_tokenizer}",
          "--config.data.seq_len=64", "--config.train.batch_size=8",
          "--config.train.steps=100000", "--config.train.log_every=1",
          "--config.train.checkpoint_every=100000", "--config.mlm.max_predictions=10"]
  proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 400
  while time.time() < deadline and not train_losses(wd).get(3):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "checkpointed step" in out
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 3
  assert max(train_losses(wd)) == steps[-1]
