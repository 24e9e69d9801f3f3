"""The GPU script's parts that run anywhere: the profile summary (a synthetic GPU trace and a
real CPU one, both trace formats), the benchmark table, and the script's syntax. The
script itself is checked end to end with `TOY=1 bash launch/gpu_bench.sh OUT` (docs/gpu.md)."""

import json
import subprocess

import pytest

from launch import bench_table, profile_summary as ps
from tests.conftest import REPO


def meta(ph, pid, name, value, tid=None):
  e = {"ph": ph, "pid": pid, "name": name, "args": {"name": value}}
  if tid is not None:
    e["tid"] = tid
  return e


def op(pid, tid, name, ts, dur, hlo=True):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur,
          "args": {"hlo_op": name} if hlo else {}}


def test_summary_of_a_gpu_like_trace():
  trace = {"traceEvents": [
      meta("M", 1, "process_name", "/host:CPU"), meta("M", 2, "process_name", "/device:GPU:0"),
      meta("M", 2, "thread_name", "XLA Ops", 10), meta("M", 2, "thread_name", "Stream #7", 11),
      meta("M", 2, "thread_name", "XLA Modules", 12),
      op(1, 1, "fusion.1", 0, 999),  # host-side launch: not a device op
      op(2, 10, "while.3", 0, 100), op(2, 10, "fusion.1", 10, 30), op(2, 10, "fusion.2", 50, 40),
      op(2, 10, "custom-call.4", 200, 60),
      op(2, 11, "sm90_gemm_kernel", 10, 30), op(2, 11, "fmha_kernel", 200, 60),  # kernels
      op(2, 12, "jit_train_step", 0, 260, hlo=False),
  ]}
  s = ps.summarize_trace(trace, steps=2, top=10)
  (p,) = s["processes"]
  assert p["process"] == "/device:GPU:0" and p["ops_from"] == "the 'XLA Ops' thread"
  ops = {r["name"]: r for r in p["top_ops"]}
  assert set(ops) == {"while.3", "fusion.1", "fusion.2", "custom-call.4"}
  assert ops["while.3"]["total_ms"] == pytest.approx(0.030)  # self time: 100 - 30 - 40
  assert p["op_time_ms_per_step"] == pytest.approx((30 + 30 + 40 + 60) / 1e3 / 2)
  assert p["top_ops"][0]["name"] == "custom-call.4"
  kinds = {r["name"]: r["count"] for r in p["top_op_kinds"]}
  assert kinds == {"fusion": 2, "while": 1, "custom-call": 1}
  assert [r["name"] for r in p["top_kernels"]] == ["fmha_kernel", "sm90_gemm_kernel"]
  assert p["modules"][0]["name"] == "jit_train_step"
  assert "custom-call.4" in ps.format_summary(s)


def test_summary_of_a_real_cpu_trace_in_both_formats(tmp_path):
  import glob

  import jax
  import jax.numpy as jnp
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(2):
      f(x).block_until_ready()
  _, trace = ps.load_trace(str(tmp_path))
  (xplane,) = glob.glob(str(tmp_path / "**" / "*.xplane.pb"), recursive=True)
  a = ps.summarize_trace(trace, 2)
  b = ps.summarize_trace(ps.trace_from_xplane(xplane), 2)
  for s in (a, b):
    (p,) = s["processes"]
    assert p["process"].startswith("/host:CPU") and p["op_time_ms_per_step"] > 0
  names = lambda s: {r["name"] for r in s["processes"][0]["top_ops"]}  # noqa: E731
  assert names(a) == names(b) and names(a)


def test_bench_table_and_script_syntax(tmp_path):
  side = {"tokens_per_s": 1000.0, "mfu": 0.25, "peak_memory": {"bytes": 2 * 1024 ** 3},
          "compile_s": 12.3}
  r = {"preset": "bert,base", "objectives": "mlm:1.0", "batch_size": 256, "seq_len": 128,
       "dtype": "bfloat16", "attention_impl": "cudnn", "attention_dropout": 0.0,
       "device": {"device_kind": "NVIDIA H200"}, "ratio_tokens_per_s": 2.0,
       "peak_flops_per_device": {"value": 989.4e12, "source": "published: H200 bfloat16 dense"},
       "ours": dict(side, tokens_per_s=2000.0, cudnn_attention_calls=["__cudnn$fmhaSoftmax"]),
       "peer": side}
  path = tmp_path / "bench_bert_s128_cudnn.json"
  path.write_text(json.dumps(r))
  t = bench_table.table([str(path)])
  assert "| bert_s128_cudnn | bert,base |" in t and "**2.00x**" in t
  assert "cudnn -> cuDNN fused" in t and "25.0%" in t and "2.0 / 2.0 GiB" in t
  assert "989.4 TFLOP/s per device (published: H200 bfloat16 dense)" in t
  subprocess.run(["bash", "-n", str(REPO / "launch" / "gpu_bench.sh")], check=True)
