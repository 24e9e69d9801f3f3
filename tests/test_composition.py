"""Every pair of registered objectives (and a few triples) is either refused when the config
is built, with a message, or each objective's loss, metrics and gradients-to-be on a fixed
batch and key equal what it gives alone (same parameters, same key)."""

import functools
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

import objectives
from bert_jax import hf, train
from tests.conftest import tiny_config
from tests.test_train import SPECIAL, random_batch

BUILTIN = ("mlm", "nsp", "sop", "rtd", "plm", "distill")  # the first six, walked every run
SENTENCE_LEVEL = ("nsp", "sop", "sso", "sdp", "sro")  # each needs examples of its own kind
TRIPLES = (("mlm", "nsp", "rtd"), ("mlm", "sop", "plm"), ("nsp", "rtd", "plm"))


def refusal(names) -> str | None:
  """Why a combination must be refused (a pattern of the message), or None."""
  if len(set(names) & set(SENTENCE_LEVEL)) > 1:
    return "need different kinds of examples"
  if {"mlm", "distill"} <= set(names):
    return r"both train params\['mlm'\]"
  return None


@pytest.fixture(scope="module")
def teacher_wd(tmp_path_factory):
  """A distillation teacher of the tiny config's shape, imported from transformers."""
  root = tmp_path_factory.mktemp("teacher")
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=64))
  model.save_pretrained(root / "hf")
  hf.import_to_workdir(str(root / "hf"), str(root / "wd"))
  return str(root / "wd")


def config_for(names, teacher_wd):
  c = tiny_config("unused")
  c.objectives = ",".join(f"{n}:1.0" for n in names)
  c.model.update(dict(hidden_dropout=0.0, attention_dropout=0.0))  # train mode == eval mode
  c.mesh.data = 1
  c.plm.max_predictions = 12
  c.distill.teacher = teacher_wd
  if "wso" in c:
    c.wso.max_ngrams = 6
  return c


def clean_batch():
  """A batch with every field some objective reads (labels valid for 2, 3 or 9 classes)."""
  b = random_batch(0, batch=4)
  rng = np.random.default_rng(1)
  b["segment_ids"][:, 32:] = 1
  b["sentence_label"] = np.array([0, 1, 1, 0], np.int32)
  real = b["word_ids"] >= 0
  b["cap_labels"] = np.where(real, rng.integers(0, 2, b["input_ids"].shape), -1).astype(np.int32)
  b["uncased_ids"] = np.where(real, b["input_ids"] // 2 * 2, b["input_ids"]).astype(np.int32)
  b["tdr_labels"] = np.where(real, rng.integers(0, 2, b["input_ids"].shape), -1).astype(np.int32)
  return jax.tree.map(np.asarray, b)


def loss_and_grads(setup, params, batch):
  """Train-mode losses and metrics on a fixed key, and the gradient norm."""
  corrupted = train.corrupt(setup, batch, jax.random.PRNGKey(11))
  (_, metrics), grads = jax.value_and_grad(train.compute_loss, has_aux=True)(
      params, setup, corrupted, jax.random.PRNGKey(12), False)
  return metrics, jax.tree.reduce(lambda a, g: a + jax.numpy.sum(g * g), grads, 0.0)


def init_params(setup, batch):
  corrupted = train.corrupt(setup, batch, jax.random.PRNGKey(0))
  return nn.meta.unbox(jax.jit(lambda b: setup.model.init(
      jax.random.PRNGKey(1), b, deterministic=True))(corrupted)["params"])


def alone(name, teacher_wd, cache):
  """(params, train-mode metrics) of one objective alone, computed once per name."""
  if name not in cache:
    setup = train.build_setup(config_for((name,), teacher_wd), SPECIAL)
    params = init_params(setup, clean_batch())
    metrics, _ = jax.jit(functools.partial(loss_and_grads, setup))(params, clean_batch())
    cache[name] = (params, jax.device_get(metrics))
  return cache[name]


def check(names, teacher_wd, cache):
  """"refused" (with the expected message) or "valid" (each loss equal to its own alone)."""
  batch = clean_batch()
  key = tuple(names)
  why = refusal(names)
  if why:
    with pytest.raises(ValueError, match=why):
      train.build_setup(config_for(names, teacher_wd), SPECIAL)
    return "refused"
  setup = train.build_setup(config_for(names, teacher_wd), SPECIAL)
  params = init_params(setup, batch)
  together, grad_sq = jax.jit(functools.partial(loss_and_grads, setup))(params, batch)
  together = jax.device_get(together)
  assert np.isfinite(float(grad_sq)) and float(grad_sq) > 0, key
  for w in setup.objectives:
    name = w.objective.name
    alone_params, alone_metrics = alone(name, teacher_wd, cache)
    # Same parameters: initialisation keys follow the module paths, not the combination.
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                              alone_params, {k: params[k] for k in alone_params})
    assert all(jax.tree.leaves(chex_equal)), (key, name)
    mine = sorted(k for k in together if k.startswith(name + "/"))
    assert mine == sorted(k for k in alone_metrics if k.startswith(name + "/")), (key, name)
    for k in mine:
      np.testing.assert_allclose(np.asarray(together[k]), np.asarray(alone_metrics[k]),
                                 rtol=2e-5, atol=1e-6, err_msg=f"{key}: {k}")
  return "valid"


def walk_pairs(names, teacher_wd):
  cache: dict = {}
  outcome = {pair: check(pair, teacher_wd, cache) for pair in itertools.combinations(names, 2)}
  assert set(cache) == {n for p, o in outcome.items() if o == "valid" for n in p}
  return outcome


def test_every_pair_of_the_first_six_is_valid_or_refused(teacher_wd):
  assert set(BUILTIN) <= set(objectives.available())
  outcome = walk_pairs(BUILTIN, teacher_wd)
  assert {p for p, o in outcome.items() if o == "refused"} == {("nsp", "sop"), ("mlm", "distill")}
  assert outcome[("mlm", "rtd")] == "valid"  # ELECTRA's paper ablates MLM beside RTD


@pytest.mark.slow
def test_every_pair_of_registered_objectives_is_valid_or_refused(teacher_wd):
  names = tuple(objectives.available())
  outcome = walk_pairs(names, teacher_wd)
  assert all(o == "valid" for p, o in outcome.items() if refusal(p) is None)


def test_triples(teacher_wd):
  cache: dict = {}
  assert [check(names, teacher_wd, cache) for names in TRIPLES] == ["valid"] * len(TRIPLES)


def test_shared_view_is_encoded_once():
  """MLM and NSP read the same masked input: one encoder pass, one mask."""
  setup = train.build_setup(config_for(("mlm", "nsp"), ""), SPECIAL)
  assert len(setup.objectives.views) == 1 and setup.objectives.passes() == (0,)
  batch = train.corrupt(setup, clean_batch(), jax.random.PRNGKey(0))
  mlm, nsp = (setup.objectives.inputs(batch, w.objective) for w in setup.objectives)
  np.testing.assert_array_equal(mlm["input_ids"], nsp["input_ids"])
  assert (np.asarray(mlm["input_ids"]) != batch["clean"]["input_ids"]).any()
  # The clean batch is never written over.
  np.testing.assert_array_equal(batch["clean"]["input_ids"], clean_batch()["input_ids"])


def test_rtd_beside_mlm_keeps_its_own_masks():
  """The combination that used to double the [MASK] count: each keeps its own ~15%."""
  setup = train.build_setup(config_for(("mlm", "rtd"), ""), SPECIAL)
  batch = train.corrupt(setup, clean_batch(), jax.random.PRNGKey(0))
  real = np.asarray(clean_batch()["attention_mask"]).sum()
  for w in setup.objectives:
    inputs = setup.objectives.inputs(batch, w.objective)
    masked = (np.asarray(inputs["input_ids"]) == SPECIAL.mask).sum()
    assert 0.05 * real < masked < 0.16 * real, (w.objective.name, masked, real)
