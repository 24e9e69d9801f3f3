"""On a GPU (`pytest -m gpu`, with JAX_PLATFORMS=cuda: conftest defaults to the CPU):
cuDNN's fused attention against XLA's in bf16, bf16 compute against fp32, and a 2-step
pretraining run plus a fine-tuning step. Skipped elsewhere.

The comparisons go through `train.compute_loss` on one pre-corrupted, padded batch
(deterministic: the fused kernel has no dropout) of the bert,tiny encoder's shape (hidden
128, 2 heads of 64, so cuDNN applies), at length 128.
"""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax import train
from bert_jax.data import bundled
from objectives.base import SpecialIds
from tests.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu",
                       reason=f"needs a GPU: JAX's backend is {jax.default_backend()!r} "
                              "(run with JAX_PLATFORMS=cuda on a CUDA machine)"),
]

V = 512
SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=V)
B, L = 8, 128
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%); over 2 layers, a softmax
# and a 512-way cross-entropy the loss moves well under 1%, the gradients by a few %.
LOSS_RTOL = 1e-2
GRAD_REL_L2 = 3e-2


def config(**model):
  c = tiny_config("unused")
  c.model.update(dict(hidden_size=128, num_heads=2, intermediate_size=512, num_layers=2,
                      max_position_embeddings=L, **NO_DROPOUT))
  c.model.update(model)
  c.data.seq_len = L
  c.mlm.max_predictions = 20
  return c


def padded_batch(seed: int = 0):
  """Sequences of different lengths, so the attention mask matters."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, V, size=(B, L)).astype(np.int32)
  lengths = rng.integers(L // 2, L + 1, size=B)
  lengths[0] = L
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids[:, 0] = 2
  ids[np.arange(B), lengths - 1] = 3
  ids = np.where(mask > 0, ids, 0)
  words = np.where(mask > 0, np.arange(L, dtype=np.int32)[None], -1)
  words[:, 0] = -1
  words[np.arange(B), lengths - 1] = -1
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids), "attention_mask": mask,
          "word_ids": words.astype(np.int32), "example_id": np.arange(B, dtype=np.int32),
          "epoch": np.zeros(B, np.int32)}


def loss_and_grads(setup, params, batch):
  """(loss, grads, compiled HLO text) of the deterministic loss."""
  fn = jax.jit(jax.value_and_grad(
      lambda p, b: train.compute_loss(p, setup, b, jax.random.PRNGKey(1), True)[0]))
  compiled = fn.lower(params, batch).compile()
  loss, grads = compiled(params, batch)
  return float(loss), grads, compiled.as_text()


@pytest.fixture(scope="module")
def reference():
  """fp32 params, one corrupted batch, and the fp32 loss and gradients (full-precision
  matmuls: XLA's default on NVIDIA GPUs is TF32, itself only 10 mantissa bits)."""
  setup = train.build_setup(config(), SPECIAL)
  batch = padded_batch()
  corrupted = jax.jit(lambda b, k: train.corrupt(setup, b, k))(batch, jax.random.PRNGKey(0))
  params = jax.jit(lambda b: nn.meta.unbox(setup.model.init(
      {"params": jax.random.PRNGKey(0)}, b, deterministic=True)["params"]))(corrupted)
  with jax.default_matmul_precision("highest"):
    loss, grads, _ = loss_and_grads(setup, params, corrupted)
  return params, corrupted, loss, grads


def rel_l2(a, b) -> float:
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64))  # noqa: E731
                                   for x in jax.tree.leaves(t)])
  x, y = flat(a), flat(b)
  return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def test_cudnn_attention_matches_xla_in_bf16(reference):
  params, batch, _, _ = reference
  runs = {impl: loss_and_grads(train.build_setup(config(dtype="bfloat16", attention_impl=impl),
                                                 SPECIAL), params, batch)
          for impl in ("cudnn", "xla")}
  (l_cudnn, g_cudnn, hlo_cudnn), (l_xla, g_xla, hlo_xla) = runs["cudnn"], runs["xla"]
  # The fused kernel really runs, forward and backward; the XLA path has none of it.
  calls = set(re.findall(r"__cudnn\$fmha\w*", hlo_cudnn))
  assert any("Backward" in c for c in calls) and any("Backward" not in c for c in calls), calls
  assert "__cudnn$fmha" not in hlo_xla
  np.testing.assert_allclose(l_cudnn, l_xla, rtol=LOSS_RTOL)
  assert np.isfinite(l_cudnn)
  assert rel_l2(g_cudnn, g_xla) < GRAD_REL_L2
  assert rel_l2(g_cudnn["encoder"]["layer_0"], g_xla["encoder"]["layer_0"]) < GRAD_REL_L2


def test_bf16_compute_matches_fp32(reference):
  params, batch, loss, grads = reference
  l16, g16, hlo = loss_and_grads(train.build_setup(config(dtype="bfloat16"), SPECIAL),
                                 params, batch)
  assert "bf16" in hlo  # the compute really is bf16 (and auto takes cuDNN here)
  np.testing.assert_allclose(l16, loss, rtol=LOSS_RTOL)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # fp32 params
  assert 0 < rel_l2(g16, grads) < GRAD_REL_L2
  assert 0 < rel_l2(g16["encoder"]["layer_0"], grads["encoder"]["layer_0"]) < GRAD_REL_L2


def test_pretrain_two_steps_then_finetune_on_gpu(tmp_path, bundled_tokenizer):
  from bert_jax.finetune import loop
  from configs.finetune import get_config
  corpus = tmp_path / "kjv.txt"
  docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
  corpus.write_text("\n\n".join("\n".join(d) for d in docs[:12]) + "\n")
  c = tiny_config(bundled_tokenizer, train__steps=2, train__eval_batches=1,
                  data__source="text", data__train_files=str(corpus),
                  data__eval_files=str(corpus), model__dtype="bfloat16",
                  model__attention_dropout=0.0)
  c.objectives = "mlm:1.0,nsp:1.0"
  pre = str(tmp_path / "pretrain")
  s = train.train_and_evaluate(c, pre)
  assert s.steps == 2 and s.tokens_per_second > 0
  assert np.isfinite(s.last_eval["loss"]) and s.last_eval["loss"] > 0
  assert os.path.isdir(os.path.join(s.checkpoint_dir, "2"))

  f = get_config("bundled")
  f.init = pre
  f.data.update(dict(seq_len=64, dynamic_padding=False))
  f.task.update(dict(max_train_examples=32, max_dev_examples=16))
  f.train.update(dict(batch_size=16, eval_batch_size=16, steps=1, log_every=1))
  f.model.update(dict(dtype="bfloat16", hidden_dropout=0.0, attention_dropout=0.0,
                      classifier_dropout=0.0))
  r = loop.finetune(f, str(tmp_path / "finetune"), quiet=True)
  assert r.steps == 1 and np.isfinite(r.last["loss"])
  assert 0.0 <= r.last["accuracy"] <= 1.0
  assert jax.devices()[0].platform == "gpu"
