"""The benchmark's JSON on a micro config (fields present and consistent, no timing
assertions), the FLOP accounting, the peak table and the memory check."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import flops, memory
from tests.conftest import REPO

MICRO = ["--config.model.vocab_size=512", "--config.model.hidden_size=32",
         "--config.model.num_heads=4", "--config.model.intermediate_size=64",
         "--config.model.num_layers=2", "--config.model.max_position_embeddings=64"]


def test_benchmark_cli_writes_consistent_json(tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark is meant to run
  r = subprocess.run(
      [sys.executable, "-m", "launch.benchmark", "--config=configs/pretrain.py:bert,tiny",
       "--peer=hf", "--steps=2", "--warmup=1", "--round_steps=1", "--batch_size=4",
       "--seq_len=32", "--torch_threads=1", f"--out={out}", *MICRO],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "ratio ours/peer tokens/s" in r.stdout
  res = json.loads(out.read_text())
  assert res["batch_size"] == 4 and res["seq_len"] == 32
  assert res["objectives"] == "mlm:1.0,nsp:1.0"  # the preset's; the peer: BertForPreTraining
  assert "BertForPreTraining" in res["peer"]["name"]
  assert res["device"]["platform"] == "cpu" and res["device"]["num_devices"] == 1
  assert res["threads"]["torch_intra_op"] == 1
  assert res["load_average"]["start"] and res["command"].startswith("python -m launch.benchmark")
  peak = res["peak_flops_per_device"]
  assert peak["value"] > 0 and peak["source"].startswith("measured")
  ours, peer = res["ours"], res["peer"]
  for f in (ours, peer):
    assert 0 < f["step_time"]["min"] <= f["step_time_s"] <= f["step_time"]["max"]
    assert f["tokens_per_s"] == pytest.approx(4 * 32 / f["step_time_s"])
    assert f["flops"]["tokens"] == 4 * 32
    assert f["mfu"] == pytest.approx(f["flops"]["total"] / f["step_time_s"] / peak["value"])
    assert f["peak_memory"]["bytes"] > 0
    assert f["loss_first"] > 0 and f["loss_last"] > 0
  assert ours["params"] == peer["params"]  # same model, counted by each framework
  # Ours: XLA's count of the compiled step; the peer's: the hand formula, by parts.
  assert ours["flops"]["total"] == ours["xla_flops_per_device_step"] > 0
  parts = peer["flops"]
  assert parts["total"] == pytest.approx(parts["dense"] + parts["attention"] + parts["output"]
                                         + parts["other"])
  assert parts["other"] > 0  # the NSP head
  assert res["ratio_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
  assert ours["compile_s"] > 0 and ours["memory"]["total_bytes"] > 0
  assert ours["xla_flops_per_device_step"] > 0


def cfg(**kw):
  from bert_jax.encoder import EncoderConfig
  return EncoderConfig(**dict(dict(hidden_size=768, intermediate_size=3072, num_layers=12,
                                   num_heads=12, vocab_size=30522), **kw))


def test_flops_accounting_for_bert_base():
  c = cfg()
  # 12 layers x (4 H^2 + 2 H F) = 84.9M non-embedding matmul weights.
  assert flops.encoder_matmul_params_per_token(c) == 12 * (4 * 768 ** 2 + 2 * 768 * 3072)
  masked = flops.mlm_step_flops(c, 8, 128, predictions_per_seq=20)
  everywhere = flops.mlm_step_flops(c, 8, 128, predictions_per_seq=128)
  assert masked.attention == 12 * 12 * 128 * 768 * 8 * 128
  assert masked.dense == everywhere.dense and masked.output * 128 == everywhere.output * 20
  assert 6 * 84.9e6 < masked.per_token < everywhere.per_token
  factorized = cfg(embedding_size=128)
  assert (flops.encoder_matmul_params_per_token(factorized)
          == flops.encoder_matmul_params_per_token(c) + 128 * 768)
  assert flops.mfu(1e12, 0.5, 1e12) == pytest.approx(2.0)


def test_published_peaks():
  assert flops.published_peak("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
  assert flops.published_peak("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756.5e12)
  assert flops.published_peak("NVIDIA H200", "float32") == pytest.approx(494.7e12)
  assert flops.published_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == pytest.approx(312e12)
  assert flops.published_peak("TPU v5 lite", "bfloat16") == pytest.approx(197e12)
  assert flops.published_peak("TPU v4", "float32") == pytest.approx(275e12)
  assert flops.published_peak("cpu", "float32") is None


class FakeDevice:
  platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

  def memory_stats(self):
    return {"bytes_limit": 80 * memory.GiB}


def test_check_fits_raises_before_training():
  def report(total):
    return {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "available": True,
            "total_bytes": total, "argument_bytes": total // 2, "output_bytes": 0,
            "alias_bytes": 0, "temp_bytes": total // 2}
  memory.check_fits(report(10 * memory.GiB), FakeDevice())
  with pytest.raises(MemoryError, match=r"needs 90\.00 GiB per device.*grad_accum.*fsdp"):
    memory.check_fits(report(90 * memory.GiB), FakeDevice())
  memory.check_fits({"mesh": {}, "available": False, "total_bytes": None}, FakeDevice())


def test_report_memory_of_a_compiled_step():
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh
  mesh = Mesh([jax.devices()[0]], ("data",))
  x = jnp.ones((256, 256))
  c = jax.jit(lambda a: jnp.tanh(a @ a) @ a, donate_argnums=0).lower(x).compile()
  r = memory.report_memory(c, mesh)
  assert r["available"] and r["argument_bytes"] == 256 * 256 * 4
  assert r["total_bytes"] >= r["argument_bytes"] and r["mesh"] == {"data": 1}
  assert "GiB" in memory.format_report(r)
  memory.check_fits(r, jax.devices()[0])  # a few hundred KiB fit anywhere


@pytest.mark.slow  # compiling ELECTRA's two towers takes 1-2 minutes on 2 loaded cores
def test_electra_benchmark_runs_both_towers_like_the_peer():
  """In process, one device of the mesh: ELECTRA's generator + discriminator vs the
  transformers pair, the same parameter count and both steps timed."""
  from configs.pretrain import get_config
  from launch import benchmark
  c = get_config("electra,tiny")
  c.model.update(dict(vocab_size=512, hidden_size=32, num_heads=4, intermediate_size=64,
                      num_layers=1, embedding_size=16, max_position_embeddings=32))
  c.mesh.data = 1
  res = benchmark.run(c, peer="hf", steps=1, warmup=1, round_steps=1,
                      batch_size=4, seq_len=32, torch_threads=1, log=lambda _: None)
  ours, peer = res["ours"], res["peer"]
  assert res["device"]["num_devices"] == 1
  assert ours["params"] == peer["params"]
  assert "ElectraForPreTraining" in peer["name"]
  assert ours["flops"]["total"] > 0 and peer["flops"]["output"] > 0
  assert ours["loss_last"] > 0 and peer["loss_last"] > 0 and res["ratio_tokens_per_s"] > 0


def test_peer_is_the_one_the_objectives_name():
  from configs.pretrain import get_config
  from launch import benchmark
  import objectives
  from bert_jax.budget import stand_in_special

  def build(spec):
    c = get_config("bert,tiny")
    c.objectives = spec
    return objectives.build(c, stand_in_special(c.model.vocab_size))

  assert benchmark.peer_builder(build("mlm:1.0,sop:1.0")).__name__ == "bert"
  assert benchmark.peer_builder(build("rtd:1.0")).__name__ == "electra"
  for spec in ("plm:1.0", "mlm:1.0,rtd:1.0"):  # no peer; two different peers
    with pytest.raises(ValueError, match="no one PyTorch peer"):
      benchmark.peer_builder(build(spec))
  # Refused before anything is compiled.
  with pytest.raises(ValueError, match="no one PyTorch peer"):
    benchmark.run(get_config("bert,tiny"), peer="hf", objectives="plm:1.0")


@pytest.mark.parametrize("preset", ["bert,tiny", "electra,tiny", "mobilebert,tiny"])
def test_dense_flops_count_every_kernel_once(preset):
  # Each token passes every dense kernel of a (non-shared) encoder once: the count must
  # equal the kernels in the parameter tree (MobileBERT: bottlenecks, stacked FFNs,
  # trigram projection included).
  import jax
  import jax.numpy as jnp
  from configs.pretrain import get_config
  from bert_jax.encoder import Encoder, EncoderConfig
  cfg = EncoderConfig.from_dict(get_config(preset).model)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda: Encoder(cfg).init(jax.random.PRNGKey(0), ids, ids, ids))
  kernels = sum(int(np.prod(x.shape)) for path, x in
                jax.tree_util.tree_leaves_with_path(params)
                if "kernel" in jax.tree_util.keystr(path))
  assert flops.encoder_matmul_params_per_token(cfg) == kernels
