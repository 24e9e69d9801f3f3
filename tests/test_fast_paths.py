"""Each fast path gives the loss (and gradients) of the plain path on a tiny model.

Compared on one pre-corrupted batch through `train.compute_loss` (deterministic: the fused
attention has no dropout, and dropout masks are randomness, not a path): masked-position
MLM vs vocabulary logits everywhere, bf16 compute vs fp32, XLA's fused attention vs the
explicit one, per-layer remat vs none, a vocabulary padded to a multiple of 128, and the
tensor-parallel sharding preset; gradient accumulation through `train.train_step`. The
functions are compiled at XLA's backend optimisation level 0 (both sides of every
comparison alike) to keep the file fast on two loaded cores.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import sharding, train
from objectives.base import SpecialIds
from tests.conftest import tiny_config

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=512)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
B, L = 8, 32


def config(**model):
  c = tiny_config("unused")
  c.model.update(dict(num_layers=1, max_position_embeddings=L, attention_impl="xla"))
  c.model.update(model)
  c.data.seq_len = L
  c.mlm.max_predictions = 6
  return c


def full_length_batch(seed: int, batch: int = B):
  """Unpadded sequences: every example gets the same number of masked positions."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 512, size=(batch, L)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  words = np.tile(np.arange(L, dtype=np.int32), (batch, 1))
  words[:, [0, -1]] = -1
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids),
          "word_ids": words, "example_id": np.arange(batch, dtype=np.int32) + 100 * seed,
          "epoch": np.zeros(batch, np.int32)}


def compiled(fn, *args, **jit_kwargs):
  return jax.jit(fn, **jit_kwargs).lower(*args).compile(compiler_options=FAST_COMPILE)


def loss_and_grads(setup, params, batch, mesh=None, rules=None, shardings=None):
  def f(p, b):
    return train.compute_loss(p, setup, b, jax.random.PRNGKey(1), True)[0]

  fn = jax.value_and_grad(f)
  if mesh is None:
    return compiled(fn, params, batch)(params, batch)
  bs = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    c = compiled(fn, params, batch, in_shardings=(shardings, bs), out_shardings=(None, shardings))
    return c(jax.device_put(params, shardings), jax.device_put(batch, bs))


@pytest.fixture(scope="module")
def plain():
  """The plain path: fp32, xla attention, no remat, unpadded vocab; params, batch, loss."""
  setup = train.build_setup(config(), SPECIAL)
  batch = full_length_batch(0)
  corrupted = compiled(lambda b, k: train.corrupt(setup, b, k), batch, jax.random.PRNGKey(0))(
      batch, jax.random.PRNGKey(0))
  init = compiled(lambda b: nn.meta.unbox(setup.model.init(
      {"params": jax.random.PRNGKey(0)}, b, deterministic=True)["params"]), corrupted)
  params = init(corrupted)
  loss, grads = loss_and_grads(setup, params, corrupted)
  return params, corrupted, loss, grads


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_masked_positions_only_equals_predict_all(plain):
  params, batch, loss, grads = plain
  c = config()
  c.mlm.predict_all = True
  l2, g2 = loss_and_grads(train.build_setup(c, SPECIAL), params, batch)
  np.testing.assert_allclose(l2, loss, rtol=1e-6)
  assert_trees_close(g2, grads, rtol=1e-4, atol=1e-7)


def test_bf16_compute_is_close_and_params_stay_fp32(plain):
  params, batch, loss, grads = plain
  setup = train.build_setup(config(dtype="bfloat16"), SPECIAL)
  l2, g2 = loss_and_grads(setup, params, batch)
  np.testing.assert_allclose(l2, loss, rtol=2e-2)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g2))
  # The loss of a fresh model hardly depends on the encoder; its gradients do: relative L2
  # error at bf16's level (8 mantissa bits), for the encoder layer and for everything.
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
  for ours, ref in ((g2["encoder"]["layer_0"], grads["encoder"]["layer_0"]), (g2, grads)):
    a, b = flat(ours), flat(ref)
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert 0 < rel < 3e-2, rel
  shapes = jax.eval_shape(lambda: setup.model.init({"params": jax.random.PRNGKey(0)}, batch,
                                                   deterministic=True))
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(shapes))} == {jnp.dtype("float32")}


def test_fused_xla_attention_equals_explicit(plain):
  params, batch, loss, grads = plain
  l2, g2 = loss_and_grads(train.build_setup(config(attention_impl="explicit"), SPECIAL),
                          params, batch)
  np.testing.assert_allclose(l2, loss, rtol=1e-6)
  assert_trees_close(g2, grads, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_equals_no_remat(plain, policy):
  params, batch, loss, grads = plain
  l2, g2 = loss_and_grads(train.build_setup(config(remat=policy), SPECIAL), params, batch)
  np.testing.assert_allclose(l2, loss, rtol=1e-6)
  assert_trees_close(g2, grads, rtol=1e-5, atol=1e-8)


def _pad_params(params, vocab: int):
  """The plain model's parameters with the vocabulary rows a padded table adds (random
  embeddings, zero bias, as a fresh init would give them)."""
  rng = np.random.default_rng(0)
  p = jax.tree.map(np.asarray, params)
  emb = p["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  extra = rng.normal(0, 0.02, (vocab - emb.shape[0], emb.shape[1])).astype(np.float32)
  p["encoder"]["embeddings"]["word_embeddings"]["embedding"] = np.concatenate([emb, extra])
  bias = p["mlm"]["head"]["bias"]
  p["mlm"]["head"]["bias"] = np.concatenate([bias, np.zeros(vocab - bias.shape[0], np.float32)])
  return p


def test_padded_vocab_equals_unpadded(plain):
  """A table padded to a multiple of 128 is a layout choice: the padded rows can never be
  a target or a prediction, so the loss and the real rows' gradients are unchanged."""
  params, batch, loss, grads = plain
  setup = train.build_setup(config(vocab_size=640), SPECIAL)  # 512 tokens, padded to 5 x 128
  l2, g2 = loss_and_grads(setup, _pad_params(params, 640), batch)
  np.testing.assert_allclose(l2, loss, rtol=1e-6)
  g2["encoder"]["embeddings"]["word_embeddings"]["embedding"] = (
      g2["encoder"]["embeddings"]["word_embeddings"]["embedding"][:512])
  g2["mlm"]["head"]["bias"] = g2["mlm"]["head"]["bias"][:512]
  assert_trees_close(g2, grads, rtol=1e-4, atol=1e-7)


def test_tensor_parallel_preset_equals_one_device(plain):
  params, batch, loss, grads = plain
  c = config()
  c.mesh.update(dict(data=1, fsdp=2, tensor=4))
  c.sharding.mode = "tensor"
  setup = train.build_setup(c, SPECIAL)
  mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c.sharding)
  _, shardings = train.state_shardings(setup, 0, full_length_batch(0), mesh, rules)
  l2, g2 = loss_and_grads(setup, params, batch, mesh, rules, shardings.params)
  w = g2["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]
  assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_allclose(l2, loss, rtol=1e-5)
  assert_trees_close(g2, grads, rtol=1e-3, atol=1e-6)


def test_grad_accumulation_equals_one_batch(plain):
  """2 micro-batches vs 1: equal when both halves hold the same number of masked tokens
  (our MLM loss is normalised per micro-batch), which full-length sequences guarantee."""
  params, _, _, _ = plain
  batch = full_length_batch(1, batch=2 * B)
  # No dropout: its masks are drawn per micro-batch, so they differ between the splits.
  base = train.build_setup(config(hidden_dropout=0.0, attention_dropout=0.0), SPECIAL)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optax.sgd(1.0).init(params), rng=jax.random.PRNGKey(3))
  out = {}
  for k in (1, 2):
    setup = dataclasses.replace(base, tx=optax.sgd(1.0), grad_accum=k)
    step = compiled(functools.partial(train.train_step, setup=setup), state, batch)
    new_state, metrics = step(state, batch)
    out[k] = (metrics, new_state.params)
  (m1, p1), (m2, p2) = out[1], out[2]
  assert float(m1["mlm/loss"][1]) == float(m2["mlm/loss"][1]) > 0  # same masked tokens
  np.testing.assert_allclose(m2["mlm/loss"][0], m1["mlm/loss"][0], rtol=1e-5)
  np.testing.assert_allclose(m2["loss"][0] / m2["loss"][1], m1["loss"][0] / m1["loss"][1],
                             rtol=1e-5)
  assert_trees_close(p2, p1, rtol=1e-4, atol=1e-6)  # sgd(1): params - grads


def test_auto_attention_picks_cudnn_only_where_it_applies():
  from bert_jax.encoder import fused_attention_impl
  assert fused_attention_impl("auto", "gpu", jnp.bfloat16, 64) == "cudnn"
  assert fused_attention_impl("auto", "gpu", jnp.float16, 128) == "cudnn"
  assert fused_attention_impl("auto", "gpu", jnp.float32, 64) == "xla"  # no fp32 flash
  assert fused_attention_impl("auto", "gpu", jnp.bfloat16, 100) == "xla"  # head size
  assert fused_attention_impl("auto", "gpu", jnp.bfloat16, 256) == "xla"
  assert fused_attention_impl("auto", "cpu", jnp.bfloat16, 64) == "xla"
  assert fused_attention_impl("auto", "tpu", jnp.bfloat16, 64) == "xla"
  assert fused_attention_impl("cudnn", "cpu", jnp.float32, 64) == "cudnn"  # asked: kept
