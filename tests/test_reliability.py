"""Faults injected into the loop: non-finite losses (stop / skip), preemption (SIGTERM),
SIGKILL at random moments, a full disk while saving, a damaged checkpoint, a teacher of
another vocabulary."""

import collections
import os
import re
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
from tests.conftest import REPO, times_logged, tiny_config, train_losses
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
  # Resumed from checkpoint 2 (steps 3 and 4 redone), not restarted from scratch.
  assert times_logged(wd) == {1: 1, 2: 1, 3: 2, 4: 2, 5: 1, 6: 1}


def test_sigterm_checkpoints_before_exit(tmp_path, bundled_tokenizer):
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
  # Not 0: a scheduler must not read a preempted run as done. 128 + SIGTERM, as a shell.
  assert proc.returncode == 128 + signal.SIGTERM == 143, out[-3000:]
  assert "checkpointed step" in out
  steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] >= 3
  assert max(train_losses(wd)) == steps[-1]


# ------------------------------------------------------------------ faults of a real process

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes <step>.orbax-checkpoint-tmp*, then renames


def pretrain_command(config, workdir, **changes) -> list[str]:
  """`python -m launch.pretrain` running exactly `config` (with `changes`, "train.x": v): a
  flag for every field that differs from the preset."""
  from configs.pretrain import get_config
  base = run_config.flatten(get_config("bert,tiny"))
  fields = dict(run_config.flatten(config), **changes)
  return [sys.executable, "-m", "launch.pretrain", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in fields.items() if base.get(k) != v)]


ENV = dict(os.environ, PYTHONPATH=str(REPO))  # with conftest's JAX cache: no recompiles


def logged_rows(workdir) -> dict[tuple[str, int], list[dict]]:
  """Every row of metrics.jsonl by (split, step), timing fields dropped."""
  rows = collections.defaultdict(list)
  for r in metrics_lib.read_metrics(str(workdir)):
    rows[r["split"], r["step"]].append(
        {k: v for k, v in r.items() if k not in ("time", "tokens_per_second")})
  return rows


def assert_same_params(workdir, reference, step):
  a, step_a = checkpoint_lib.restore_params(str(workdir))
  b, _ = checkpoint_lib.restore_params(reference, step=step)
  assert step_a == step
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigkill_at_random_moments_resumes_bit_identically(tmp_path, reference_run):
  config, reference = reference_run
  wd, rng = tmp_path / "run", np.random.default_rng(7)
  ckpts = wd / "checkpoints"
  # Checkpoints every 2 steps, written asynchronously while the next steps run.
  cmd = pretrain_command(config, wd, **{"train.async_checkpoint": True})
  # SIGKILL during the step after a seeded-random one, then inside the asynchronous write of
  # checkpoint 4, each after a seeded-random delay. Each kill costs a launch (10-20 s of
  # start-up), hence two.
  plan = [("step", int(rng.integers(1, 4))), ("write", 4)]
  kills = []

  def train_rows():
    return [r for r in metrics_lib.read_metrics(str(wd)) if r["split"] == "train"]

  with open(tmp_path / "log.txt", "w") as log:
    while plan:
      what, step = plan[0]
      logged = len(train_rows())
      proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
      tmp = f"{step}{TMP_SUFFIX}"

      def ready():
        if what == "write":  # orbax has created the temporary directory of checkpoint `step`
          return ckpts.is_dir() and any(p.startswith(tmp) for p in os.listdir(ckpts))
        return any(r["step"] >= step for r in train_rows()[logged:])  # logged by this launch

      deadline = time.monotonic() + 300
      while not ready():
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} {step} to kill within 300 s"
        time.sleep(0.005)
      time.sleep(rng.uniform(0, 0.05))
      proc.kill()
      proc.wait()
      kills.append((what, step, max((r["step"] for r in train_rows()), default=0)))
      plan.pop(0)
      if what == "write":
        names = os.listdir(ckpts)
        if str(step) in names:  # the write finished before the kill: aim at the next one
          assert step < 6, kills
          plan.append(("write", step + 2))
        else:  # killed mid-write: the temporary directory is left, and is not a checkpoint
          assert any(p.startswith(tmp) for p in names), names
  # The last relaunch runs to the end; in-process, where the steps are compiled already.
  train.train_and_evaluate(config, str(wd))
  # Every step and eval logged, each time with the reference's values (data order, masks,
  # dropout and optimizer state included), and some logged more than once.
  got, want = logged_rows(wd), logged_rows(reference)
  assert sorted(got) == sorted(want)
  for key, rows in got.items():
    assert all(r == want[key][0] for r in rows), (key, rows, want[key])
  assert any(len(rows) > 1 for rows in got.values()), kills
  assert_same_params(wd, reference, step=6)
  assert not [p for p in os.listdir(ckpts) if TMP_SUFFIX in p]  # cleaned at the next start


def test_full_disk_while_saving_stops_clearly_and_keeps_the_last_checkpoint(
    tmp_path, reference_run):
  config, reference = reference_run
  wd = tmp_path / "run"
  train.train_and_evaluate(config, str(wd), stop_after=2)  # checkpoint 2, while there is room
  # Relaunch with every file capped at 64 KiB (RLIMIT_FSIZE, with SIGXFSZ ignored so that
  # write() fails with EFBIG as on a full disk instead of killing the process): config,
  # metrics and event files stay below it, the checkpoint's data files do not. A wrapper
  # sets the limit (preexec_fn is unsafe in this multithreaded process).
  limit = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16)); "
           "os.execv(sys.executable, sys.argv[1:])")
  cmd = pretrain_command(config, wd, **{"train.async_checkpoint": True})
  r = subprocess.run([sys.executable, "-c", limit, *cmd], cwd=REPO, env=ENV,
                     capture_output=True, text=True, timeout=300)
  # One message on the command line (exit 1, a fault of the run), not orbax's writer
  # threads' pages of tracebacks (launch/errors.py; --verbose shows them).
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, (r.stderr.count("Traceback"), r.stderr[-3000:])
  assert len([line for line in r.stderr.splitlines() if line.startswith("error: ")]) == 1
  # The logged line, whole.
  messages = [line for line in r.stderr.splitlines() if "checkpoint save failed" in line]
  assert messages, r.stderr[-3000:]
  assert re.search(r"checkpoint save failed at step 4 in " + re.escape(str(wd / "checkpoints"))
                   + r": \[Errno 27\] File too large \([\d,.]+ MiB free there\); the disk "
                   r".*may be full\. The checkpoints at steps \[2\] are intact", messages[0]), \
      messages[0]
  # The half-written step 4 is not a checkpoint; step 2 restores to the reference's state.
  names = os.listdir(wd / "checkpoints")
  assert "4" not in names and any(p.startswith("4" + TMP_SUFFIX) for p in names), names
  assert_same_params(wd, reference, step=2)
  # With room again, the same command resumes from step 2 and ends as the reference did.
  train.train_and_evaluate(config, str(wd))
  got, want = logged_rows(wd), logged_rows(reference)
  assert sorted(got) == sorted(want)
  assert len(got["train", 3]) == 2  # step 3 was redone: the run resumed from step 2
  for key, rows in got.items():
    assert all(r == want[key][0] for r in rows), key
  assert_same_params(wd, reference, step=6)
  assert not [p for p in os.listdir(wd / "checkpoints") if TMP_SUFFIX in p]


def test_teacher_with_another_vocabulary_fails_before_compute(tmp_path, reference_run):
  config, teacher = reference_run  # a trained run with vocabulary 512 serves as the teacher
  c = tiny_config(config.data.tokenizer, config.data.cache_dir, model__vocab_size=640)
  c.objectives = "distill:1.0"
  c.distill.teacher = teacher
  with pytest.raises(ValueError, match=r"teacher's vocabulary \(512\) differs from the "
                                       r"student's model.vocab_size \(640\)"):
    train.train_and_evaluate(c, str(tmp_path / "student"))
  assert not (tmp_path / "student" / "checkpoints").exists()
  assert not (tmp_path / "student" / "metrics.jsonl").exists()
