"""Orbax checkpoints of the full training state plus the data iterator's position.

A checkpoint is `<workdir>/checkpoints/<step>/{state,data}`: `state` is the TrainState
(params, optimizer state, step, rng) written by every host for its shards, `data` is
grain's per-process iterator state. Orbax writes asynchronously into a temporary
directory and renames it when complete, so a crash mid-write never leaves a checkpoint
that looks complete. The last `keep` checkpoints are kept, plus the best by eval loss.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_DIR = "checkpoints"


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
        enable_async_checkpointing=async_save, create=True)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, step: int, state: Any, data_iterator: Any | None,
           metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                             force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
    """Restores the state onto the shardings in `abstract_state`; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return restored["state"]

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest_good(self, abstract_state: Any, data_iterator: Any | None
                          ) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back; a damaged one (truncated files, a
    partial copy) is skipped with a warning and the one before it is used."""
    for step in reversed(self.all_steps()):
      try:
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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
