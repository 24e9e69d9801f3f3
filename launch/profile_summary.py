r"""Profile a few of our train steps with `jax.profiler` and keep only a summary: the XLA
ops (and on GPUs the kernels) with the most time. The trace itself is too big to keep.

  python -m launch.profile_summary --config configs/pretrain.py:bert,base --seq_len 128 \
      --batch_size 256 --out profile.json [--steps 5] [--top 25] [--config.FIELD=VALUE ...]

The step is launch.benchmark's (synthetic batches, donated state, compiled ahead of time);
`--warmup` steps run first, then `--steps` under `jax.profiler.trace`. The summary is read
from the `*.trace.json.gz` the profiler writes beside its `.xplane.pb` (Chrome trace JSON:
gzip + json, no TensorBoard plugin needed). Writes JSON to --out and text beside it (.txt).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

from launch import config_cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_cli.define_config("configs/pretrain.py:bert,base",
                           "Config file and preset, e.g. configs/pretrain.py:bert,base.")
  flags.DEFINE_string("objectives", "", "Objectives to profile (default: the config's).")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
  flags.DEFINE_integer("seq_len", None, "Sequence length (default: the config's).")
  flags.DEFINE_integer("warmup", 2, "Untimed, unprofiled steps after compilation.")
  flags.DEFINE_integer("steps", 5, "Profiled steps.")
  flags.DEFINE_integer("top", 25, "How many ops / kernels to list.")
  flags.DEFINE_string("out", "profile_summary.json", "The summary JSON (text beside it).")
  flags.DEFINE_string("trace_dir", "", "Keep the raw trace here (default: a temporary "
                      "directory, deleted).")


# ----------------------------------------------------------------------------- parsing


def load_trace(trace_dir: str) -> tuple[str, dict[str, Any]]:
  """The newest `*.trace.json.gz` under trace_dir, parsed; without one (a profiler that
  writes only XSpace protos), the newest `*.xplane.pb` read through jaxlib's ProfileData."""
  def found(pattern: str) -> list[str]:
    return glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)

  files = found("*.trace.json.gz")
  if files:
    path = max(files, key=os.path.getmtime)
    with gzip.open(path, "rt") as f:
      return path, json.load(f)
  files = found("*.xplane.pb")
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz or *.xplane.pb under {trace_dir}: "
                            f"{sorted(found('*'))}")
  path = max(files, key=os.path.getmtime)
  return path, trace_from_xplane(path)


def trace_from_xplane(path: str) -> dict[str, Any]:
  """An XSpace proto as Chrome-trace events: planes are processes, lines threads."""
  from jax.profiler import ProfileData
  events = []
  for pid, plane in enumerate(ProfileData.from_file(path).planes):
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": plane.name}})
    for tid, line in enumerate(plane.lines):
      events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                     "args": {"name": line.name}})
      events.extend({"ph": "X", "pid": pid, "tid": tid, "name": e.name,
                     "ts": e.start_ns / 1e3, "dur": e.duration_ns / 1e3,
                     "args": dict(e.stats)} for e in line.events)
  return {"traceEvents": events}


def _category(op: str) -> str:
  """'loop_add_fusion.12' -> 'loop_add_fusion', 'custom-call.3' -> 'custom-call'."""
  return re.sub(r"(\.\d+)+$", "", op)


def self_times(events: list[dict[str, Any]]) -> list[float]:
  """Each event's duration less that of the events nested directly in it on its thread (a
  `while` op contains its body's ops), so totals count every microsecond once."""
  self_us = [float(e["dur"]) for e in events]
  by_thread = collections.defaultdict(list)
  for i, e in enumerate(events):
    by_thread[e.get("tid")].append(i)
  for idx in by_thread.values():
    stack: list[int] = []
    for i in sorted(idx, key=lambda i: (events[i].get("ts", 0.0), -events[i]["dur"])):
      start = events[i].get("ts", 0.0)
      while stack and events[stack[-1]].get("ts", 0.0) + events[stack[-1]]["dur"] <= start:
        stack.pop()
      if stack and "ts" in events[i]:
        self_us[stack[-1]] -= events[i]["dur"]
      stack.append(i)
  return [max(t, 0.0) for t in self_us]


def _table(durations: dict[str, list[float]], steps: int, total_us: float, top: int):
  rows = sorted(durations.items(), key=lambda kv: -sum(kv[1]))[:top]
  return [{"name": name[:160], "count": len(d), "total_ms": round(sum(d) / 1e3, 3),
           "ms_per_step": round(sum(d) / 1e3 / steps, 4),
           "fraction": round(sum(d) / total_us, 4) if total_us else None}
          for name, d in rows]


def summarize_trace(trace: dict[str, Any], steps: int, top: int = 25) -> dict[str, Any]:
  """Top XLA ops by total duration, per device process of a Chrome trace.

  XLA ops are the complete ("X") events that carry an `hlo_op` argument, timed by their
  self time (`self_times`: nested ops counted once). Device processes
  ("/device:GPU:0", ...) are preferred; without any (XLA:CPU) the host's. Where a process
  has an "XLA Ops" thread, only that one counts (its stream threads run the same ops as
  kernels); stream threads' events are listed separately as kernels. On a CPU the ops of
  the thread pool overlap, so their total exceeds the wall time.
  """
  events = trace.get("traceEvents", [])
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  device_pids = [p for p, n in procs.items() if n.startswith("/device:")]
  pids = [p for p in device_pids if any(e["pid"] == p for e in complete)] or [
      p for p, n in procs.items() if n.startswith("/host:")]
  out = []
  for pid in sorted(pids, key=lambda p: procs[p]):
    mine = [e for e in complete if e["pid"] == pid]
    thread = lambda e: threads.get((pid, e.get("tid")), "")  # noqa: E731
    has_ops_line = any(thread(e) == "XLA Ops" for e in mine)
    ops, cats, kernels, modules = (collections.defaultdict(list) for _ in range(4))
    op_events = []
    for e in mine:
      t = thread(e)
      if t == "XLA Modules":
        modules[e["name"]].append(float(e["dur"]))
      elif t.startswith("Stream"):
        kernels[e["name"]].append(float(e["dur"]))
      if t != "XLA Modules" and (e.get("args") or {}).get("hlo_op") and (
          t == "XLA Ops" or not has_ops_line):
        op_events.append(e)
    for e, dur in zip(op_events, self_times(op_events)):
      ops[e["args"]["hlo_op"]].append(dur)
      cats[_category(e["args"]["hlo_op"])].append(dur)
    total = sum(sum(d) for d in ops.values())
    if not ops and not kernels:
      continue
    out.append({
        "process": procs[pid],
        "ops_from": "the 'XLA Ops' thread" if has_ops_line else "events with an hlo_op",
        "op_time_ms_per_step": round(total / 1e3 / steps, 3),
        "distinct_ops": len(ops),
        "top_ops": _table(ops, steps, total, top),
        "top_op_kinds": _table(cats, steps, total, top),
        "top_kernels": _table(kernels, steps, sum(sum(d) for d in kernels.values()), top),
        "modules": _table(modules, steps, sum(sum(d) for d in modules.values()), top),
    })
  return {"steps": steps, "processes": out}


def format_summary(s: dict[str, Any]) -> str:
  lines = [f"{s.get('preset', '')} {s.get('objectives', '')}: batch {s.get('batch_size')} x "
           f"{s.get('seq_len')}, {s.get('dtype')}, attention_impl {s.get('attention_impl')}, "
           f"{s.get('device_kind')}; {s['steps']} profiled steps, "
           f"{s.get('wall_s_per_step', 0) * 1e3:.1f} ms per step (wall, under the profiler)"]
  for p in s["processes"]:
    lines.append(f"\n{p['process']}: {p['op_time_ms_per_step']:.1f} ms of XLA ops (self "
                 f"time) per step ({p['distinct_ops']} distinct ops, from {p['ops_from']})")
    for title, key in (("ops", "top_ops"), ("op kinds (numbered suffix dropped)",
                                            "top_op_kinds"), ("kernels", "top_kernels"),
                       ("modules", "modules")):
      if not p[key]:
        continue
      lines.append(f"  top {title}:  ms/step  share  count  name")
      for r in p[key]:
        share = "" if r["fraction"] is None else f"{100 * r['fraction']:5.1f}%"
        lines.append(f"    {r['ms_per_step']:10.3f} {share:>6} {r['count']:6d}  {r['name']}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- run


def profile(config, *, objectives: str = "", batch_size: int | None = None,
            seq_len: int | None = None, warmup: int = 2, steps: int = 5, top: int = 25,
            trace_dir: str = "") -> dict[str, Any]:
  import jax
  from launch import benchmark

  config = benchmark.bench_config(config, objectives, batch_size, seq_len)
  bs, sl = int(config.train.batch_size), int(config.data.seq_len)
  ours = benchmark.Ours(config, bs, sl)
  benchmark.warm_up(ours.step, warmup)
  keep = bool(trace_dir)
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="jax_trace_")
  try:
    with jax.profiler.trace(trace_dir):
      t = time.perf_counter()
      for i in range(steps):
        ours.step(warmup + i)
      wall = time.perf_counter() - t
    path, trace = load_trace(trace_dir)
    summary = summarize_trace(trace, steps, top)
    summary["trace_bytes"] = os.path.getsize(path)
  finally:
    if not keep:
      shutil.rmtree(trace_dir, ignore_errors=True)
  device = jax.devices()[0]
  summary.update({
      "preset": f"{config.family},{config.size}", "objectives": config.objectives, "batch_size": bs, "seq_len": sl,
      "dtype": str(config.model.dtype), "attention_impl": config.model.attention_impl,
      "attention_dropout": float(config.model.attention_dropout),
      "device_kind": device.device_kind, "platform": device.platform,
      "jax": jax.__version__, "compile_s": ours.compile_s, "wall_s_per_step": wall / steps,
      "cudnn_attention_calls": benchmark.cudnn_attention_calls(ours.compiled),
      "trace_dir": trace_dir if keep else None})
  return summary


def main(argv):
  del argv
  s = profile(FLAGS.config, objectives=FLAGS.objectives, batch_size=FLAGS.batch_size,
              seq_len=FLAGS.seq_len, warmup=FLAGS.warmup, steps=FLAGS.steps, top=FLAGS.top,
              trace_dir=FLAGS.trace_dir)
  s["command"] = " ".join(["python -m launch.profile_summary", *sys.argv[1:]])
  text = format_summary(s)
  print(text, flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(s, f, indent=2)
  with open(os.path.splitext(FLAGS.out)[0] + ".txt", "w") as f:
    f.write(text + "\n")
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
