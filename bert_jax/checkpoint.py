"""Orbax checkpoints of the full training state plus the data iterator's position.

A checkpoint is `<workdir>/checkpoints/<step>/{state,data,progress}`: `state` is the
TrainState (params, optimizer state, step, rng) written by every host for its shards, `data`
is grain's per-process iterator state, `progress` (optional) a JSON dict of the run's own
bookkeeping (fine-tuning's best dev score and early-stopping count), saved with the state so
that a resumed run continues exactly from the step it restores. Orbax writes asynchronously into a temporary
directory and renames it when complete, so a crash mid-write never leaves a checkpoint
that looks complete; leftover temporary directories are removed at the next start. The
last `keep` checkpoints are kept, plus the best by eval loss. A save that fails (a full
disk) raises CheckpointSaveError naming the step, the directory, the OS error and the free
space; the checkpoints before it stay intact.
"""

from __future__ import annotations

import logging
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


def _best_loss(metrics: dict[str, float]) -> float:
  return metrics.get("eval/loss", float("inf"))


class Checkpointer:
  """Keeps the last `keep` checkpoints and the best one by eval loss."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True):
    preservation = [policies.LatestN(n=max(keep, 1))]
    if keep_best:
      preservation.append(policies.BestN(get_metric_fn=_best_loss, reverse=True, n=1))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preservation),
        enable_async_checkpointing=async_save, create=True,
        # A write cut short (SIGKILL, full disk) leaves a temporary directory: free its space.
        cleanup_tmp_directories=True)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.async_save = async_save
    self._in_flight: int | None = None  # step of the asynchronous save still being written
    self._failed = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

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

    with_progress: returns (state, the step's progress dict, or None if it has none)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    has_progress = os.path.isdir(os.path.join(self.directory, str(step), PROGRESS_ITEM))
    if with_progress and has_progress:
      items[PROGRESS_ITEM] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint %s/%d", self.directory, step)
    if with_progress:
      return restored["state"], (restored[PROGRESS_ITEM] if has_progress else None)
    return restored["state"]

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest_good(self, abstract_state: Any, data_iterator: Any | None,
                          with_progress: bool = False) -> tuple[Any, ...] | None:
    """Restores the newest checkpoint that reads back; a damaged one (truncated files, a
    partial copy) is skipped with a warning and the one before it is used.

    Returns (state, step), or (state, step, progress) with `with_progress`; None when there
    is no checkpoint."""
    for step in reversed(self.all_steps()):
      try:
        if with_progress:
          state, progress = self.restore(step, abstract_state, data_iterator, True)
          return state, step, progress
        return self.restore(step, abstract_state, data_iterator), step
      except Exception as e:  # orbax/tensorstore raise many types for damaged files
        logging.warning("checkpoint %s/%d is unreadable (%s: %s); moved aside to %s, "
                        "trying an older one", self.directory, step, type(e).__name__,
                        str(e)[:200], self.directory + "_unreadable")
        self._move_aside(step)
    if self.all_steps():
      raise RuntimeError(f"no checkpoint in {self.directory} could be restored "
                         f"(steps {self.all_steps()}); see the warnings above")
    return None

  def _move_aside(self, step: int) -> None:
    """Keeps a damaged checkpoint for inspection, out of the way of the step's next save."""
    aside = self.directory + "_unreadable"
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, f"{step}.{int(time.time())}")
    os.replace(os.path.join(self.directory, str(step)), target)
    self.manager.reload()

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
  if step is None:
    step = manager.best_step() if which == "best" else manager.latest_step()
    step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no complete checkpoint in {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=None)))
  state = restored["state"]
  params = state["params"] if isinstance(state, dict) else state.params
  manager.close()
  return jax.tree.map(lambda x: x, params), int(step)
