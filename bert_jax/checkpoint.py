"""Orbax checkpoints of the full training state plus the data iterator's position.

A checkpoint is `<workdir>/checkpoints/<step>/{state,data,progress}`: `state` is the
TrainState (params, optimizer state, step, rng) written by every host for its shards, `data`
is grain's per-process iterator state, `progress` (optional) a JSON dict of the run's own
bookkeeping (fine-tuning's best dev score and early-stopping count), saved with the state so
that a resumed run continues exactly from the step it restores. Orbax writes asynchronously into a temporary
directory and renames it when complete, so a crash mid-write never leaves a checkpoint
that looks complete; leftover temporary directories are removed at the next start. The
last `keep` checkpoints are kept, plus the best by eval loss. A checkpoint's eval loss is
written with it (orbax's `metrics` item) only when the eval ran at its own step, so the
retention and `best` hold across relaunches and never rank a checkpoint by a stale eval.
A save that fails (a full disk) raises CheckpointSaveError naming the step, the directory,
the OS error and the free space; the checkpoints before it stay intact. A restore that
finds no readable checkpoint raises UnreadableCheckpointError instead of starting over.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"
PROGRESS_ITEM = "progress"


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (disk full, quota, permissions); the older ones are intact."""

  def __init__(self, message: str, step: int, directory: str):
    super().__init__(message)
    self.step, self.directory = step, directory


def _os_error(e: BaseException) -> str | None:
  """The OS error behind an orbax/tensorstore failure: tensorstore reports it only as text
  ("... [os_error_code='28']"), Python I/O as an OSError somewhere in the chain."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return f"[Errno {seen.errno}] {seen.strerror}"
    seen = seen.__cause__ or seen.__context__
  m = re.search(r"os_error_code='?(\d+)", str(e))
  return f"[Errno {m.group(1)}] {os.strerror(int(m.group(1)))}" if m else None


class UnreadableCheckpointError(RuntimeError):
  """Checkpoints exist but none reads back; the run refuses to start over silently."""

  def __init__(self, message: str, steps: list[int], directory: str):
    super().__init__(message)
    self.steps, self.directory = steps, directory


def eval_loss(metrics: dict[str, Any] | None) -> float | None:
  """The eval loss recorded with a checkpoint; None when it has none (or a non-finite one)."""
  if not metrics:
    return None
  value = metrics.get("eval/loss")
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _best_loss(metrics: dict[str, float]) -> float:
  value = eval_loss(metrics)
  return float("inf") if value is None else value


@dataclasses.dataclass(kw_only=True)
class BestByEvalLoss:
  """orbax PreservationPolicy: the `n` checkpoints of lowest recorded eval loss. Those with
  none (saved between evals, or by an older version) are left to the other policies, not
  kept forever as orbax's BestN does with `keep_checkpoints_without_metrics`."""

  n: int = 1

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
    del context
    ranked = sorted((eval_loss(c.metrics), i) for i, c in enumerate(checkpoints)
                    if eval_loss(c.metrics) is not None)
    keep = {i for _, i in ranked[:self.n]}
    return [i in keep for i in range(len(checkpoints))]


def best_step(manager: ocp.CheckpointManager) -> int | None:
  """The step of lowest recorded eval loss (the latest such on ties); None if none has one."""
  scored = [(eval_loss(manager.metrics(s)), -s) for s in manager.all_steps()]
  scored = sorted((v, s) for v, s in scored if v is not None)
  return -scored[0][1] if scored else None


class Checkpointer:
  """Keeps the last `keep` checkpoints and the best one by eval loss."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True):
    preservation = [policies.LatestN(n=max(keep, 1))]
    if keep_best:
      preservation.append(BestByEvalLoss(n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preservation),
        # best_fn makes orbax write the metrics with each checkpoint (and read them back on
        # relaunch); which ones are kept is decided by the policies above alone.
        best_fn=_best_loss if keep_best else None, best_mode="min",
        enable_async_checkpointing=async_save, create=True,
        # A write cut short (SIGKILL, full disk) leaves a temporary directory: free its space.
        cleanup_tmp_directories=True)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.async_save = async_save
    self.keep_best = keep_best
    self._in_flight: int | None = None  # step of the asynchronous save still being written
    self._failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return best_step(self.manager)

  def save(self, step: int, state: Any, data_iterator: Any | None,
           metrics: dict[str, float] | None = None, force: bool = False,
           progress: dict[str, Any] | None = None) -> bool:
    # orbax waits for the previous asynchronous save here anyway; waiting first attributes a
    # failure of that write to its own step.
    self.wait()
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if progress is not None:
      items[PROGRESS_ITEM] = ocp.args.JsonSave(progress)
    if self.keep_best:
      # {} rather than None: no eval at this step (not a candidate for best), and no orbax
      # warning about missing metrics.
      metrics = metrics or {}
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                                force=force)
    except Exception as e:
      raise self._save_error(step, e) from e
    if saved and self.async_save:
      self._in_flight = step
    return saved

  def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
    self._failed = True
    try:
      free = f"{shutil.disk_usage(self.directory).free / 2**20:,.1f} MiB free there"
    except OSError:
      free = "free space unknown"
    kept = self.all_steps()  # orbax has already dropped the failed step from its list
    reason = _os_error(e)
    hint = "; the disk (or a quota or file size limit) may be full" if reason else ""
    reason = reason or f"{type(e).__name__}: {str(e)[:300]}"
    message = (f"checkpoint save failed at step {step} in {self.directory}: {reason} "
               f"({free}){hint}. "
               + (f"The checkpoints at steps {kept} are intact: free some space and relaunch "
                  "the same command to resume from the newest." if kept
                  else "No checkpoint is kept yet."))
    # Logged as one line too: orbax's writer threads print pages of tracebacks that can
    # bury (and interleave with) the final traceback.
    logging.error("%s", message)
    return CheckpointSaveError(message, step, self.directory)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
              with_progress: bool = False) -> Any:
    """Restores the state onto the shardings in `abstract_state`; the iterator in place.

    The state first: the iterator is moved only once the state has read back, so a damaged
    checkpoint leaves the iterator where it was (at the start, or for the next candidate).
    with_progress: returns (state, the step's progress dict, or None if it has none).
    """
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]
    if data_iterator is not None:
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    logging.info("restored checkpoint %s/%d", self.directory, step)
    if not with_progress:
      return state
    progress = None
    if os.path.isdir(os.path.join(self.directory, str(step), PROGRESS_ITEM)):
      progress = self.manager.restore(step, args=ocp.args.Composite(
          **{PROGRESS_ITEM: ocp.args.JsonRestore()}))[PROGRESS_ITEM]
    return state, progress

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest_good(self, abstract_state: Any, data_iterator: Any | None, *,
                          restart_if_unreadable: bool = False,
                          with_progress: bool = False) -> tuple[Any, ...] | None:
    """Restores the newest checkpoint that reads back; a damaged one (truncated files, a
    partial copy) newer than it is moved aside with a warning.

    Returns (state, step), or (state, step, progress) with `with_progress`. None when there
    is no checkpoint. When there are checkpoints and none reads back, raises
    UnreadableCheckpointError naming them (left in place, so relaunching gives the same
    answer) unless `restart_if_unreadable`: then they are moved aside and None is returned
    (a fresh start, as asked).
    """
    bad: list[tuple[int, str]] = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, abstract_state, data_iterator, with_progress)
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        reason = f"{type(e).__name__}: {str(e)[:200]}"
        logging.warning("checkpoint %s/%d is unreadable (%s)", self.directory, step, reason)
        bad.append((step, reason))
        continue
      for s, _ in bad:
        where = self._move_aside(s)
        logging.warning("checkpoint %d was unreadable: moved aside to %s; resumed from "
                        "step %d", s, where, step)
      if with_progress:
        return restored[0], step, restored[1]
      return restored, step
    if not bad:
      return None
    steps = sorted(s for s, _ in bad)
    if restart_if_unreadable:
      moved = [self._move_aside(s) for s in steps]
      logging.warning("no checkpoint in %s reads back (steps %s); moved them to %s and "
                      "starting over from step 0 (train.restart_if_unreadable)",
                      self.directory, steps, ", ".join(moved))
      return None
    raise UnreadableCheckpointError(
        f"none of the checkpoints in {self.directory} could be restored: steps {steps} are "
        f"unreadable (newest: {bad[0][1]}). They are left in place. Restore them from a "
        "backup, or relaunch with --config.train.restart_if_unreadable=True to move them "
        f"aside to {self.directory}_unreadable/ and start over from step 0.",
        steps, self.directory)

  def _move_aside(self, step: int) -> str:
    """Keeps a damaged checkpoint for inspection, out of the way of the step's next save."""
    aside = self.directory + "_unreadable"
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, f"{step}.{int(time.time())}")
    os.replace(os.path.join(self.directory, str(step)), target)
    self.manager.reload()
    return target

  def wait(self) -> None:
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(step, e) from e

  def close(self) -> None:
    try:
      self.wait()
      self.manager.close()
    except Exception as e:
      if not self._failed:
        raise
      # Closing after a failed save: the CheckpointSaveError already raised is the news.
      logging.warning("closing the checkpoint manager after a failed save: %s", e)


def restore_params(workdir: str, step: int | None = None, which: str = "latest") -> tuple[dict, int]:
  """Parameters alone (host numpy-backed arrays, no shardings needed), e.g. for fine-tuning.

  `which` is "latest" or "best" when `step` is None. Returns (params, step).
  """
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {directory})")
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, best_fn=_best_loss, best_mode="min"))
  if which not in ("latest", "best"):
    raise ValueError(f"which={which!r} is not one of ('latest', 'best')")
  if step is None and not manager.all_steps():
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  if step is None and which == "best":
    step = best_step(manager)
    if step is None:
      raise ValueError(
          f"no checkpoint in {directory} has an eval loss recorded (steps "
          f"{sorted(manager.all_steps())}): best is undefined there (train.keep_best off, "
          "checkpoint steps that are not eval steps, or a run of an older version). Use "
          "the latest (init_which=latest) or a given step (init_step=N).")
  if step is None:
    step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=None)))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  manager.close()
  return jax.tree.map(lambda x: x, params), int(step)
