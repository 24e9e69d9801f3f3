"""Structured pruning: heads removed physically equal heads gated off, Michel et al.'s
importance, layer dropping (bert_jax.compress.prune)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bert_jax.compress import prune
from bert_jax.encoder import EncoderConfig
from bert_jax.finetune.tasks import TaskObjective, task_loss
from bert_jax.model import PretrainModel

CFG = EncoderConfig(vocab_size=97, hidden_size=32, num_layers=3, num_heads=4,
                    intermediate_size=48, max_position_embeddings=32, hidden_dropout=0.0,
                    attention_dropout=0.0)


def batch(n=4, length=12, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((n, length), np.int32)
  mask[1, 8:] = 0
  return {"input_ids": rng.integers(5, 97, (n, length)).astype(np.int32),
          "segment_ids": np.zeros((n, length), np.int32), "attention_mask": mask,
          "example_weight": np.ones((n,), np.float32),
          "label": rng.integers(0, 3, (n,)).astype(np.int32)}


def model_and_params(cfg=CFG, seed=0):
  model = PretrainModel(cfg, (TaskObjective("classification", 3, 0.0),))
  key = jax.random.PRNGKey(seed)
  params = nn.meta.unbox(model.init({"params": key}, batch(), deterministic=True))["params"]
  return model, jax.tree.map(np.array, params)


def logits(model, params, b, gates=None):
  variables = {"params": params}
  if gates is not None:
    variables["head_gates"] = gates
  return np.asarray(model.apply(variables, b, deterministic=True)["task"])


def test_pruned_heads_equal_masked_heads():
  model, params = model_and_params()
  remove = {0: [1, 3], 2: [0]}
  b = batch()
  masked = logits(model, params, b, prune.mask_gates(CFG, remove))
  assert not np.allclose(masked, logits(model, params, b))  # the heads mattered
  cfg2, params2 = prune.prune_heads(CFG, params, remove)
  assert cfg2.pruned_heads == ((1, 3), (), (0,))
  assert [cfg2.layer_heads(i) for i in range(3)] == [2, 4, 3]
  q = params2["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert q.shape == (32, 2, 8)
  np.testing.assert_array_equal(q, params["encoder"]["layer_0"]["attention"]["query"]
                                ["kernel"][:, [0, 2]])
  model2 = PretrainModel(cfg2, model.composition)
  # the pruned model's own init has the pruned shapes: it is a model of its own
  shapes = jax.eval_shape(lambda: model2.init({"params": jax.random.PRNGKey(0)}, b,
                                              deterministic=True))
  assert jax.tree.map(np.shape, nn.meta.unbox(shapes)["params"]) == jax.tree.map(
      np.shape, params2)
  np.testing.assert_allclose(logits(model2, params2, b), masked, atol=1e-5, rtol=1e-5)
  # pruning again counts in original indices; the config round-trips through JSON lists
  cfg3, params3 = prune.prune_heads(cfg2, params2, {0: [2]})
  assert cfg3.pruned_heads == ((1, 2, 3), (), (0,))
  assert EncoderConfig.from_dict(
      {k: (list(map(list, v)) if k == "pruned_heads" else v)
       for k, v in cfg3.to_dict().items()}) == cfg3
  again = logits(PretrainModel(cfg3, model.composition), params3, b)
  np.testing.assert_allclose(again, logits(model, params, b, prune.mask_gates(
      CFG, {0: [1, 2, 3], 2: [0]})), atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="leaving at least one"):
    dataclasses.replace(CFG, pruned_heads=((0, 1, 2, 3), (), ()))
  with pytest.raises(ValueError, match="layer 0 has no head"):
    prune.prune_heads(cfg2, params2, {0: [1]})


def test_head_importance_and_selection():
  model, params = model_and_params()
  # a head whose output projection is zero cannot matter: importance exactly 0
  params["encoder"]["layer_1"]["attention"]["output"]["kernel"][2] = 0.0

  def loss_fn(p, gates, b):
    out = model.apply({"params": p, "head_gates": gates}, b, deterministic=True)["task"]
    return task_loss("classification", out, b)[0], b["example_weight"]

  raw = prune.head_importance(CFG, loss_fn, params, [batch(seed=s) for s in range(2)],
                              normalize=False)
  assert [len(x) for x in raw] == [4, 4, 4] and raw[1][2] == 0.0
  assert all(np.all(x[np.arange(4) != 2] > 0) for x in raw[:1])
  # E_x |dL_x/dxi|: the same as per-example gradients computed one by one
  b = batch(n=2, seed=0)
  single = [jax.grad(lambda g, bb=bb: loss_fn(params, g, bb)[0])(prune.ones_gates(CFG))
            for bb in ({k: v[i:i + 1] for k, v in b.items()} for i in range(2))]
  want = np.mean([np.abs(s["encoder"]["layer_0"]["attention"]["gate"]) for s in single], 0)
  got = prune.head_importance(CFG, loss_fn, params, [b], normalize=False)[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  norm = prune.head_importance(CFG, loss_fn, params, [batch(seed=s) for s in range(2)])
  for x in norm:
    np.testing.assert_allclose(np.linalg.norm(x), 1.0, rtol=1e-5)
  chosen = prune.heads_to_prune(CFG, norm, 0.5)
  assert sum(map(len, chosen.values())) == 6 and 2 in chosen[1]
  assert all(len(v) < 4 for v in chosen.values())
  # every head but one per layer: the floor holds
  all_but = prune.heads_to_prune(CFG, norm, 0.99)
  assert all(len(all_but[i]) == 3 for i in range(3))


def test_layer_dropping_keeps_the_right_layers():
  assert prune.layers_to_drop("top:2", 6) == [4, 5]
  assert prune.layers_to_drop("bottom:2", 6) == [0, 1]
  assert prune.layers_to_drop("alternate:2", 6) == [3, 5]
  assert prune.layers_to_drop("alternate:3", 6) == [1, 3, 5]
  assert prune.layers_to_drop("5,2", 6) == [2, 5]
  for bad, msg in (("top:6", "keep one"), ("7", "not in 0..5"), ("0,1,2,3,4,5", "all 6"),
                   ("alternate:4", "at most 3")):
    with pytest.raises(ValueError, match=msg):
      prune.layers_to_drop(bad, 6)

  model, params = model_and_params()
  cfg2, params2 = prune.drop_layers(CFG, params, [1])
  assert cfg2.num_layers == 2 and set(k for k in params2["encoder"] if "layer" in k) == {
      "layer_0", "layer_1"}
  for new, old in ((0, 0), (1, 2)):
    for a, c in zip(jax.tree.leaves(params2["encoder"][f"layer_{new}"]),
                    jax.tree.leaves(params["encoder"][f"layer_{old}"])):
      np.testing.assert_array_equal(a, c)
  # the dropped model computes exactly the original with layer 1 skipped
  b = batch()
  enc = PretrainModel(cfg2, model.composition)
  got = enc.apply({"params": params2}, b, deterministic=True)["task"]

  class Skip(nn.Module):  # the original encoder, running layers 0 and 2 only
    @nn.compact
    def __call__(self, b):
      from bert_jax.encoder import Encoder
      from bert_jax.finetune.tasks import TaskHead
      e = Encoder(dataclasses.replace(CFG, num_layers=2), name="encoder")
      return TaskHead(CFG, "classification", 3, 0.0, name="task")(None, b, e,
                                                                   deterministic=True)
  np.testing.assert_allclose(got, Skip().apply({"params": params2}, b), atol=1e-6)
  # heads pruned, then a layer dropped: pruned_heads follows its layers
  cfg3, p3 = prune.prune_heads(CFG, params, {2: [0, 1]})
  cfg4, _ = prune.drop_layers(cfg3, p3, [0])
  assert cfg4.pruned_heads == ((), (0, 1))
  cfg5, _ = prune.drop_layers(cfg3, p3, [2])
  assert cfg5.pruned_heads is None
