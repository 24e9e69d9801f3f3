r"""launch.benchmark's JSON files as one markdown table (what docs/benchmarks.md shows).

  python -m launch.bench_table OUT/bench_*.json > OUT/table.md
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

COLUMNS = ("run", "preset", "objectives", "batch x len", "dtype", "attention",
           "ours tokens/s", "PyTorch tokens/s", "ours / PyTorch", "ours MFU", "PyTorch MFU",
           "ours compile", "peak memory ours / PyTorch", "device")


def _attention(r: dict[str, Any]) -> str:
  """What ran: cuDNN's fused kernel (found in the compiled step) or XLA / explicit."""
  calls = r["ours"].get("cudnn_attention_calls") or []
  kernel = "cuDNN fused" if calls else "XLA/explicit"
  return f"{r.get('attention_impl')} -> {kernel}, dropout {r.get('attention_dropout', '?')}"


def row(name: str, r: dict[str, Any]) -> list[str]:
  GiB = 1024 ** 3
  ours, peer = r["ours"], r.get("peer")
  pct = lambda f: "-" if not f or f.get("mfu") is None else f"{100 * f['mfu']:.1f}%"  # noqa: E731
  mem = lambda f: "-" if not f else f"{f['peak_memory']['bytes'] / GiB:.1f}"  # noqa: E731
  return [name, r["preset"], r["objectives"], f"{r['batch_size']} x {r['seq_len']}", r["dtype"],
          _attention(r), f"{ours['tokens_per_s']:,.0f}",
          f"{peer['tokens_per_s']:,.0f}" if peer else "-",
          f"**{r['ratio_tokens_per_s']:.2f}x**" if peer else "-", pct(ours), pct(peer),
          f"{ours['compile_s']:.1f} s", f"{mem(ours)} / {mem(peer)} GiB",
          f"{r['device']['device_kind']}"]


def table(paths: list[str]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  peaks = {}
  for p in paths:
    with open(p) as f:
      r = json.load(f)
    name = os.path.splitext(os.path.basename(p))[0].removeprefix("bench_")
    lines.append("| " + " | ".join(row(name, r)) + " |")
    pk = r.get("peak_flops_per_device")
    if pk:
      peaks.setdefault(pk["source"], []).append(pk["value"] / 1e12)
  span = lambda v: f"{min(v):.4g}" + (f"-{max(v):.4g}" if max(v) > min(v) else "")  # noqa: E731
  lines += ["", "MFU against: " + "; ".join(f"{span(v)} TFLOP/s per device ({src})"
                                            for src, v in peaks.items())]
  return "\n".join(lines)


if __name__ == "__main__":
  print(table(sys.argv[1:]))
