"""Per-device memory of a compiled step, and a check that it fits before training starts.

XLA's memory analysis of the compiled (SPMD-partitioned) program is per device: the
arguments (this device's shards of the state and batch), the outputs, the part of the
outputs aliased onto donated arguments (the new state reuses the old state's buffers) and
the temporaries (activations kept for the backward pass, gradients, optimizer scratch).

  from bert_jax import memory
  compiled = p_train.lower(state, batch).compile()
  report = memory.report_memory(compiled, mesh)
  logging.info(memory.format_report(report))
  memory.check_fits(report, jax.local_devices()[0])  # raises MemoryError when it cannot fit
"""

from __future__ import annotations

import os
from typing import Any

GiB = 1024 ** 3
# Headroom left to the runtime (allocator fragmentation, collectives' buffers, the input
# batch in flight): the step must fit in this fraction of the device's limit.
DEFAULT_HEADROOM = 0.9


def report_memory(compiled: Any, mesh: Any) -> dict[str, Any]:
  """Per-device bytes of a compiled step from `compiled.memory_analysis()`.

  Returns a dict with argument/output/alias/temp/generated-code bytes, `total_bytes` (what
  one device needs at the step's peak, counted conservatively: arguments + outputs not
  aliased onto donated arguments + temporaries + code) and the mesh.
  """
  stats = compiled.memory_analysis()
  if isinstance(stats, (list, tuple)):  # older jax: one entry per device program
    stats = stats[0]
  mesh_shape = {str(k): int(v) for k, v in dict(getattr(mesh, "shape", {})).items()}
  report: dict[str, Any] = {"mesh": mesh_shape, "available": stats is not None}
  if stats is None:
    report["total_bytes"] = None
    return report
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  for f in fields:
    report[f.replace("_size_in_bytes", "_bytes")] = int(getattr(stats, f, 0) or 0)
  computed = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
              + report["temp_bytes"] + report["generated_code_bytes"])
  peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  # XLA's liveness-based peak where the backend reports one, for information: on CPU it
  # leaves out the temporaries, so the check uses the conservative sum.
  report["xla_peak_bytes"] = peak or None
  report["total_bytes"] = computed
  return report


def device_limit(device: Any) -> tuple[int | None, str]:
  """(bytes one device may use, where the figure comes from)."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "device memory_stats bytes_limit"
  if device.platform == "cpu":
    try:
      total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None, "unknown"
    # Simulated CPU devices share the host's memory.
    import jax
    n = max(len([d for d in jax.local_devices() if d.platform == "cpu"]), 1)
    return total // n, f"host RAM / {n} local CPU devices"
  return None, "unknown"


def check_fits(report: dict[str, Any], device: Any, headroom: float = DEFAULT_HEADROOM) -> None:
  """Raises MemoryError when the step's per-device bytes exceed the device's memory."""
  need = report.get("total_bytes")
  limit, source = device_limit(device)
  if need is None or limit is None:
    return
  if need > headroom * limit:
    mesh = report.get("mesh", {})
    raise MemoryError(
        f"the train step needs {need / GiB:.2f} GiB per device on mesh {mesh} "
        f"(arguments {report['argument_bytes'] / GiB:.2f}, temporaries "
        f"{report['temp_bytes'] / GiB:.2f}, outputs not aliased "
        f"{(report['output_bytes'] - report['alias_bytes']) / GiB:.2f} GiB) but "
        f"{device.device_kind} has {limit / GiB:.2f} GiB ({source}; {headroom:.0%} usable). "
        "Reduce train.batch_size or set train.grad_accum > 1, set model.remat=full or dots, "
        "use model.dtype=bfloat16, or shard the state: sharding.mode=fsdp with a larger "
        "mesh.fsdp (or mesh.tensor with sharding.mode=tensor).")


def format_report(report: dict[str, Any]) -> str:
  if not report.get("available") or report.get("total_bytes") is None:
    return f"memory per device on mesh {report.get('mesh')}: not reported by this backend"
  g = lambda b: f"{b / GiB:.3f} GiB"  # noqa: E731
  return (f"memory per device on mesh {report['mesh']}: {g(report['total_bytes'])} "
          f"(arguments {g(report['argument_bytes'])}, outputs {g(report['output_bytes'])}, "
          f"aliased {g(report['alias_bytes'])}, temporaries {g(report['temp_bytes'])})")
