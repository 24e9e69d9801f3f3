"""Device mesh from the config and logical-axis rules -> NamedSharding.

Model code names logical axes only (batch, length, embed, embed_proj, heads, kv, mlp,
vocab); `config.sharding.rules` maps them onto the mesh axes (data, fsdp, tensor). The same
code runs on one CPU and on a pod: only the mesh sizes and the rules change.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Selectable presets for config.sharding.mode; "custom" uses config.sharding.rules.
RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallel: parameters replicated, batch split over every device.
    "data": (("batch", ("data", "fsdp")),),
    # FSDP (ZeRO-3): parameters and optimizer state split over fsdp on the embed axis.
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("vocab", "tensor"),
             ("heads", "tensor"), ("mlp", "tensor")),
    # Megatron-style tensor parallel over heads/mlp/vocab, plus FSDP where the mesh has it.
    "tensor": (("batch", ("data", "fsdp")), ("heads", "tensor"), ("mlp", "tensor"),
               ("vocab", "tensor"), ("embed", "fsdp")),
}


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one of them may be -1 for 'the remaining devices'."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide the "
                       f"{num_devices} available devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices or (math.prod(sizes) < num_devices
                                         and jax.process_count() > 1):
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
                     f"but {num_devices} are available (use -1 for one axis)")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh; on one host a smaller mesh uses the first devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if math.prod(shape) < len(devices):
    logging.warning("mesh %s uses %d of %d devices", shape, math.prod(shape), len(devices))
  return Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), MESH_AXES)


def logical_rules(sharding_cfg: Any) -> Rules:
  """The logical->mesh rules the config selects; unnamed logical axes stay replicated."""
  mode = sharding_cfg.mode
  if mode == "custom":
    return tuple((str(k), _as_mesh_axes(v)) for k, v in sharding_cfg.rules)
  if mode not in RULE_PRESETS:
    raise ValueError(f"sharding.mode: {mode!r} is not one of {sorted(RULE_PRESETS)} or 'custom'")
  return RULE_PRESETS[mode]


def _as_mesh_axes(v):
  if v is None or isinstance(v, str):
    return v
  return tuple(v)


def data_axes(rules: Rules) -> Any:
  return dict(rules).get("batch", None)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, P(data_axes(rules)))


def batch_divisor(mesh: Mesh, rules: Rules) -> int:
  """How many ways the global batch is split: it must be a multiple of this."""
  axes = data_axes(rules)
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def tree_shardings(boxed_abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are logically partitioned (or replicated)."""
  # An optimizer's masked-out entries (optax.MaskedNode for frozen parameters) sit inside
  # the parameter's logical box but hold no array: unbox them so both trees agree.
  def drop_empty_box(x):
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) and not jax.tree.leaves(x) else x
  tree = jax.tree.map(drop_empty_box, boxed_abstract_tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Mesh and logical-axis rules in effect, for tracing jitted steps.

  The legacy `with mesh:` context, not jax.set_mesh: under set_mesh, flax's DenseGeneral
  constrains its kernel before reshaping it to the logical rank, which fails.
  """
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*context manager has been deprecated")
    with mesh, nn.logical_axis_rules(rules):
      yield


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
