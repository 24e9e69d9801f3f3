"""The fine-tuning tricks' mechanics (bert_jax/tricks.py, bert_jax/finetune/pooling.py), on a
tiny classifier through the one loop's `train.train_step`: adversarial training (FGM, PGD),
mixout, EMA/SWA, freezing, the pooling heads and multi-sample dropout."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bert_jax import train
from bert_jax import tricks as tricks_lib
from bert_jax.encoder import Encoder, EncoderConfig
from bert_jax.finetune import loop
from bert_jax.finetune.tasks import TaskObjective
from bert_jax.model import PretrainModel
from configs import pretrain
from tests.test_finetune_run import SHRINK, ft_config

import objectives as objectives_lib

B, L, N = 4, 16, 3


def encoder_config(**changes) -> EncoderConfig:
  c = pretrain.get_config("bert,tiny").model
  c.update(dict(SHRINK, hidden_dropout=0.0, attention_dropout=0.0, **changes))
  return EncoderConfig.from_dict(c)


def batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  mask = np.ones((B, L), np.int32)
  mask[1, 10:] = mask[3, 5:] = 0
  return {"input_ids": rng.integers(5, 512, (B, L)).astype(np.int32) * mask,
          "segment_ids": np.zeros((B, L), np.int32), "attention_mask": mask,
          "example_weight": np.ones((B,), np.float32),
          "label": rng.integers(0, N, (B,)).astype(np.int32)}


def make_setup(tricks=tricks_lib.Tricks(), tx=None, **task_fields) -> train.Setup:
  task = TaskObjective("classification", N, 0.0, **task_fields)
  comp = objectives_lib.compose((objectives_lib.WeightedObjective(task, 1.0),))
  model = PretrainModel(encoder_config(), comp)
  return train.Setup(model, comp, tricks.wrap_optimizer(tx or optax.sgd(1.0)), 1, "stop",
                     tricks)


def state_of(setup) -> train.TrainState:
  b = jax.tree.map(jnp.asarray, batch())
  params = setup.model.init({"params": jax.random.PRNGKey(1)}, b, deterministic=True)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params["params"])
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=setup.tx.init(params), rng=jax.random.PRNGKey(2))


def corrupted(setup):
  return train.corrupt(setup, jax.tree.map(jnp.asarray, batch()), jax.random.PRNGKey(0))


def clean_loss(setup, params):
  loss, _ = train.compute_loss(params, setup, corrupted(setup), jax.random.PRNGKey(0), True)
  return loss


def table_of(params):
  return params["encoder"]["embeddings"]["word_embeddings"]["embedding"]


def with_table(params, table):
  return tricks_lib._set(params, tricks_lib.WORD_EMBEDDINGS, table)


# ----------------------------------------------------------------------------- adversarial


def test_fgm_perturbs_by_epsilon_along_the_gradient_and_adds_its_loss():
  eps = 0.5
  adv = make_setup(tricks_lib.Tricks(adversarial=tricks_lib.Adversarial("fgm", eps)))
  state = state_of(adv)
  new, m = jax.jit(lambda s, b: train.train_step(s, b, adv))(state, batch())
  # By hand: g = dL/dtable; r = eps g / ||g||; the step's gradient = g_clean + g_adv.
  f = lambda p: clean_loss(adv, p)  # noqa: E731
  g = jax.grad(f)(state.params)
  gt = table_of(g)
  r = eps * gt / jnp.linalg.norm(gt)
  attacked = with_table(state.params, table_of(state.params) + r)
  adv_loss, g_adv = jax.value_and_grad(f)(attacked)
  np.testing.assert_allclose(float(jnp.linalg.norm(r)), eps, rtol=1e-5)
  np.testing.assert_allclose(m["adversarial_norm"][0], eps, rtol=1e-5)
  np.testing.assert_allclose(m["adversarial_loss"][0], adv_loss, rtol=1e-5)
  np.testing.assert_allclose(m["loss"][0], f(state.params) + adv_loss, rtol=1e-5)
  assert adv_loss > f(state.params)  # the perturbation raises the loss (first order)
  expected = jax.tree.map(lambda p, a, b: p - (a + b), state.params, g, g_adv)  # SGD, lr 1
  for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_pgd_stays_in_the_ball_and_one_step_of_epsilon_is_fgm():
  eps = 0.3
  pgd = make_setup(tricks_lib.Tricks(adversarial=tricks_lib.Adversarial("pgd", eps, 4, 0.2)))
  _, m = jax.jit(lambda s, b: train.train_step(s, b, pgd))(state_of(pgd), batch())
  assert float(m["adversarial_norm"][0]) <= eps * (1 + 1e-5)
  np.testing.assert_allclose(m["adversarial_norm"][0], eps, rtol=1e-4)  # 4 x 0.2 > 0.3
  one = make_setup(tricks_lib.Tricks(adversarial=tricks_lib.Adversarial("pgd", eps, 1, eps)))
  fgm = make_setup(tricks_lib.Tricks(adversarial=tricks_lib.Adversarial("fgm", eps)))
  s1, m1 = jax.jit(lambda s, b: train.train_step(s, b, one))(state_of(one), batch())
  s2, m2 = jax.jit(lambda s, b: train.train_step(s, b, fgm))(state_of(fgm), batch())
  np.testing.assert_allclose(m1["loss"][0], m2["loss"][0], rtol=1e-6)
  np.testing.assert_allclose(table_of(s1.params), table_of(s2.params), rtol=1e-6)
  r = tricks_lib.attack_step(jnp.zeros(3), jnp.array([3.0, 4.0, 0.0]), 10.0, 2.0)
  np.testing.assert_allclose(r, [1.2, 1.6, 0.0], rtol=1e-6)  # projected onto the ball


def test_no_perturbation_in_evaluation():
  plain = make_setup()
  adv = make_setup(tricks_lib.Tricks(adversarial=tricks_lib.Adversarial("fgm", 5.0)))
  state = state_of(plain)
  key = jax.random.PRNGKey(3)
  a = train.eval_step(state.params, batch(), key, plain)
  b = train.eval_step(state.params, batch(), key, adv)
  assert "adversarial_loss" not in b
  np.testing.assert_array_equal(a["loss"][0], b["loss"][0])


# ----------------------------------------------------------------------------- mixout


def test_mixout_mixes_towards_the_reference_with_the_current_weight_as_mean():
  p = 0.3
  w = {"encoder": {"layer_0": {"dense": {"kernel": jnp.full((64, 64), 2.0),
                                         "bias": jnp.full((64,), 2.0)}}}}
  w0 = jax.tree.map(lambda x: jnp.full_like(x, -1.0), w)
  out = [tricks_lib.mixout(w, w0, p, jax.random.PRNGKey(i)) for i in range(50)]
  k = np.stack([np.asarray(o["encoder"]["layer_0"]["dense"]["kernel"]) for o in out])
  # Each weight is w0 (mixed) or (w - p w0) / (1 - p) (kept), in proportions p : 1 - p.
  kept, mixed = (2.0 + p) / (1 - p), -1.0
  assert np.all(np.isclose(k, kept) | np.isclose(k, mixed))
  np.testing.assert_allclose(np.isclose(k, mixed).mean(), p, atol=0.01)
  np.testing.assert_allclose(k.mean(), 2.0, atol=0.03)  # E[mixout(w)] = w (Lee et al.)
  for o in out:  # biases are not mixed
    np.testing.assert_array_equal(o["encoder"]["layer_0"]["dense"]["bias"], 2.0)


def test_mixout_trains_from_the_reference_and_eval_is_the_identity():
  mix = make_setup(tricks_lib.Tricks(mixout=0.5))
  state = state_of(mix)
  ref = tricks_lib.find_state(state.opt_state, tricks_lib.ReferenceState)
  for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  plain = make_setup()
  key = jax.random.PRNGKey(4)
  np.testing.assert_array_equal(train.eval_step(state.params, batch(), key, mix)["loss"][0],
                                train.eval_step(state.params, batch(), key, plain)["loss"][0])
  # Training differs from plain training only by the mixing (the same step otherwise).
  _, m_mix = jax.jit(lambda s, b: train.train_step(s, b, mix))(state, batch())
  _, m_plain = jax.jit(lambda s, b: train.train_step(s, b, plain))(state_of(plain), batch())
  # At the reference, mixout(w0) = w0: the first step's loss is the plain one.
  np.testing.assert_allclose(m_mix["loss"][0], m_plain["loss"][0], rtol=1e-5)


# ----------------------------------------------------------------------------- averaging


def run_average(avg: tricks_lib.Averaging, steps: int):
  """SGD (lr 1) on gradients 1, 2, ... from w = 0; the weights and the kept average."""
  tx = tricks_lib.Tricks(averaging=avg).wrap_optimizer(optax.sgd(1.0))
  w = {"w": jnp.zeros(())}
  state, history = tx.init(w), []
  for t in range(1, steps + 1):
    updates, state = tx.update({"w": jnp.asarray(float(t))}, state, w)
    w = optax.apply_updates(w, updates)
    history.append(float(w["w"]))
  return history, float(tricks_lib.find_state(state, tricks_lib.AverageState).average["w"])


def test_ema_and_swa_equal_hand_computed_averages():
  history, ema = run_average(tricks_lib.Averaging("ema", decay=0.9, start=3), 6)
  expected = history[2]  # step 3 starts the average at the weights
  for w in history[3:]:
    expected = 0.9 * expected + 0.1 * w
  np.testing.assert_allclose(ema, expected, rtol=1e-6)
  history, swa = run_average(tricks_lib.Averaging("swa", start=2, every=2), 7)
  np.testing.assert_allclose(swa, np.mean([history[1], history[3], history[5]]), rtol=1e-6)
  history, before = run_average(tricks_lib.Averaging("swa", start=10), 4)
  assert before == history[-1]  # before `start`: the weights themselves


def test_finetuning_evaluates_and_keeps_the_average(tmp_path, bundled_tokenizer):
  from bert_jax import checkpoint as checkpoint_lib
  from tests.test_finetune_run import preset_workdir
  init = str(tmp_path / "init")
  preset_workdir("bert", bundled_tokenizer, init)
  c = ft_config(init, steps=3, eval_every=3)
  c.average.update(dict(mode="swa", start=1, every=1))
  c.optim.lr = 1e-2
  wd = str(tmp_path / "ft")
  weights = []
  for stop in (1, 2, None):  # exact resume: the weights of steps 1, 2 and 3 on the way
    s = loop.finetune(c, wd, quiet=True, stop_after=stop)
    weights.append(checkpoint_lib.restore_params(wd)[0])
  assert s.best_step == 3
  best, _ = checkpoint_lib.restore_params(os.path.join(wd, "best"))
  mean = jax.tree.map(lambda *w: np.mean(np.stack(w), 0), *weights)
  for a, b, last in zip(jax.tree.leaves(best), jax.tree.leaves(mean),
                        jax.tree.leaves(weights[-1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # SWA of steps 1..3
  assert any(not np.allclose(a, w) for a, w in zip(jax.tree.leaves(best),
                                                   jax.tree.leaves(weights[-1])))


# ----------------------------------------------------------------------------- freezing


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state():
  cfg = encoder_config()
  frozen = tricks_lib.layer_paths(cfg, embeddings=True, bottom_layers=1)
  assert frozen == (("encoder", "embeddings"), ("encoder", "layer_0"))
  from bert_jax import optim
  c = ft_config("")
  c.optim.warmup_steps = 0  # (a warmup's first learning rate is 0)
  tx = optim.make_optimizer(loop.optimizer_config(c, 10), 10, frozen)
  setup = make_setup(tricks_lib.Tricks(frozen=frozen), tx=tx)
  state = state_of(setup)
  new, m = jax.jit(lambda s, b: train.train_step(s, b, setup))(state, batch())
  for name in ("embeddings", "layer_0"):
    for a, b in zip(jax.tree.leaves(state.params["encoder"][name]),
                    jax.tree.leaves(new.params["encoder"][name])):
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(state.params["encoder"]["layer_1"]),
      jax.tree.leaves(new.params["encoder"]["layer_1"])))
  # The stop-gradient: the frozen subtree's gradient is exactly zero.
  grads = setup.tricks.grad_fn(lambda p, k: train.compute_loss(p, setup, corrupted(setup), k,
                                                             False),
                               state.opt_state)(state.params, jax.random.PRNGKey(0))[1]
  assert all(not np.any(g) for g in jax.tree.leaves(grads["encoder"]["embeddings"]))
  # No Adam moments for them: the optimizer state is the trainable parameters' size.
  n_state = sum(x.size for x in jax.tree.leaves(new.opt_state))
  n_train = sum(x.size for x in jax.tree.leaves(state.params)) - sum(
      x.size for f in ("embeddings", "layer_0")
      for x in jax.tree.leaves(state.params["encoder"][f]))
  assert n_train * 2 <= n_state <= n_train * 2 + 16, (n_state, n_train)


# ----------------------------------------------------------------------------- pooling


def encoder_states(params, cfg):
  b = batch()
  return Encoder(cfg).apply({"params": params["encoder"]}, b["input_ids"], b["segment_ids"],
                            b["attention_mask"], deterministic=True,
                            output_hidden_states=True)


@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean", "max", "attention", "concat",
                                     "weighted"])
def test_pooling_heads_equal_hand_computed_poolings(pooling):
  setup = make_setup(pooling=pooling, pool_layers=2)
  params = state_of(setup).params
  logits = setup.model.apply({"params": params}, batch(), deterministic=True)["task"]
  cfg = encoder_config()
  out = encoder_states(params, cfg)
  h = np.asarray(out["hidden_states"], np.float64)
  m = batch()["attention_mask"][..., None].astype(np.float64)
  task = jax.tree.map(lambda x: np.asarray(x, np.float64), params["task"])
  if pooling == "pooler":
    pooled = np.tanh(h[:, 0] @ task["pooler"]["dense"]["kernel"]
                     + task["pooler"]["dense"]["bias"])
  elif pooling == "cls":
    pooled = h[:, 0]
  elif pooling == "mean":
    pooled = (h * m).sum(1) / m.sum(1)
  elif pooling == "max":
    pooled = np.where(m > 0, h, -np.inf).max(1)
  elif pooling == "attention":
    s = (h @ task["attention"]["kernel"])[..., 0] + task["attention"]["bias"][0]
    s = np.where(m[..., 0] > 0, s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    pooled = ((p / p.sum(1, keepdims=True))[..., None] * h).sum(1)
  else:
    layers = [np.asarray(out["hidden_states"])[:, 0],
              np.asarray(out["all_hidden_states"][-2])[:, 0]]
    if pooling == "concat":
      pooled = np.concatenate(layers, -1)
    else:
      w = task["layer_weights"]
      pooled = (w[0] * layers[0] + w[1] * layers[1]) / w.sum()
  want = pooled @ task["classifier"]["dense"]["kernel"] + task["classifier"]["dense"]["bias"]
  np.testing.assert_allclose(logits, want, rtol=2e-4, atol=2e-5)


def test_multi_sample_dropout_averages_masks_in_training_only():
  params = state_of(make_setup()).params
  task5 = TaskObjective("classification", N, 0.5, multi_sample_dropout=5)
  task1 = TaskObjective("classification", N, 0.5)
  apply = lambda task, det, key: PretrainModel(encoder_config(), objectives_lib.compose(  # noqa: E731
      (objectives_lib.WeightedObjective(task, 1.0),))).apply(
          {"params": params}, batch(), deterministic=det, rngs={"dropout": key})["task"]
  key = jax.random.PRNGKey(5)
  np.testing.assert_allclose(apply(task5, True, key), apply(task1, True, key), rtol=1e-6)
  # Training: the mean of 5 draws varies less across keys than one draw does.
  var = lambda task: np.var(np.stack([apply(task, False, jax.random.PRNGKey(i))  # noqa: E731
                                      for i in range(12)]), 0).mean()
  assert var(task5) < 0.5 * var(task1), (var(task5), var(task1))
  with pytest.raises(ValueError, match="multi_sample_dropout"):
    TaskObjective("classification", N, 0.1, multi_sample_dropout=0)
  with pytest.raises(ValueError, match="head.pooling"):
    TaskObjective("classification", N, 0.1, pooling="median")
