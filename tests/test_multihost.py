"""Two processes on this machine (4 simulated CPU devices each, gloo collectives) train
like one process with 8 devices: per-host input sharding, checkpoints written by both
hosts, and a resume from them.

Each process runs `train.train_and_evaluate` end to end after `jax.distributed.initialize`
(the launchers' --coordinator_address / --num_processes / --process_id do the same): host p
reads elements p, p + 2, ... of the global stream, so a global batch holds the same
examples as in the one-process run, and with dropout off the losses agree up to the order
of the cross-device sums.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from bert_jax import metrics as metrics_lib
from tests.conftest import REPO

DRIVER = textwrap.dedent("""
    import json, os, sys
    num_processes, process_id, port, workdir, stop_after, tokenizer, cache = sys.argv[1:8]
    num_processes, process_id = int(num_processes), int(process_id)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
      jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                 num_processes=num_processes, process_id=process_id)
    sys.path.insert(0, REPO_PATH)
    from bert_jax import train
    from tests.conftest import tiny_config
    config = tiny_config(tokenizer, cache, train__steps=4, train__eval_every=2,
                         train__checkpoint_every=2, model__hidden_dropout=0.0,
                         model__attention_dropout=0.0)
    assert jax.device_count() == 8 and jax.process_count() == num_processes
    summary = train.train_and_evaluate(config, workdir, stop_after=int(stop_after) or None)
    print("RESULT", json.dumps({"process": jax.process_index(), "last_eval": summary.last_eval,
                                "local_devices": jax.local_device_count()}), flush=True)
""").replace("REPO_PATH", repr(str(REPO)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(script, num_processes, workdir, stop_after, tokenizer, cache, timeout=540):
  port = free_port()
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  # The resumed run compiles the same programs again: reuse them from a persistent cache
  # (the suite's, which conftest sets, else one in the test's directory).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(cache), "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(num_processes), str(i), str(port), str(workdir),
       str(stop_after), tokenizer, str(cache)], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return [json.loads(line.split("RESULT ", 1)[1]) for out in outs
          for line in out.splitlines() if line.startswith("RESULT ")]


def losses(workdir):
  rows = metrics_lib.latest_rows(metrics_lib.read_metrics(workdir))
  return {(r["split"], r["step"]): r["loss"] for r in rows}


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(tmp_path, bundled_tokenizer):
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  cache = tmp_path / "cache"
  # One process, 8 devices, 4 steps in one go (also builds the shared data cache).
  launch(script, 1, tmp_path / "one", 0, bundled_tokenizer, cache)
  # Two processes, 4 devices each: stop after step 2 (checkpoint), then resume to step 4.
  two = tmp_path / "two"
  first = launch(script, 2, two, 2, bundled_tokenizer, cache)
  assert sorted(r["process"] for r in first) == [0, 1]
  assert all(r["local_devices"] == 4 for r in first)
  assert (two / "checkpoints" / "2").is_dir()
  # Both hosts wrote their shards of the state and their own data-iterator position.
  ckpt = two / "checkpoints" / "2"
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= {p.name for p in
                                                            (ckpt / "data").iterdir()}
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in (ckpt / "state").iterdir()}
  second = launch(script, 2, two, 0, bundled_tokenizer, cache)
  assert (two / "checkpoints" / "4").is_dir()
  a, b = losses(tmp_path / "one"), losses(two)
  assert sorted(a) == sorted(b) and ("train", 4) in a and ("eval", 4) in a
  for key in a:
    assert b[key] == pytest.approx(a[key], rel=2e-5), key
  assert second[0]["last_eval"]["loss"] == pytest.approx(a[("eval", 4)], rel=2e-5)
