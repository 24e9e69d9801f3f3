"""Optimizer: AdamW with warmup + decay, no decay on biases and norms, global-norm clipping."""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax

SCHEDULES = ("linear", "cosine", "constant")


def learning_rate(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then linear (BERT) or cosine decay to `end_lr_ratio * lr`."""
  c = optim_cfg
  if c.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule: {c.schedule!r} is not one of {SCHEDULES}")
  warmup = min(int(c.warmup_steps), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = c.lr * c.end_lr_ratio
  if c.schedule == "linear":
    decay = optax.linear_schedule(c.lr, end, decay_steps)
  elif c.schedule == "cosine":
    decay = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr_ratio)
  else:
    decay = optax.constant_schedule(c.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: not biases, not LayerNorm scales/biases."""
  def keep(path, _):
    # Dict keys only: boxed (logically partitioned) leaves add an attribute key.
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names[-1] in ("bias", "scale") or any("norm" in n for n in names))
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg: Any, total_steps: int,
                   frozen: tuple[tuple[str, ...], ...] = ()) -> optax.GradientTransformation:
  """AdamW (+ clipping); parameters under a `frozen` path get no update and no state."""
  c = optim_cfg
  parts = []
  if c.clip_norm and c.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(c.clip_norm))
  parts.append(optax.adamw(learning_rate(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                           weight_decay=c.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if not frozen:
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               functools.partial(frozen_labels, frozen=frozen))


def frozen_labels(params: Any, frozen: tuple[tuple[str, ...], ...]) -> Any:
  def label(path, _):
    names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    return "frozen" if any(names[:len(f)] == tuple(f) for f in frozen) else "train"
  return jax.tree_util.tree_map_with_path(label, params)
