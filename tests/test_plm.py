"""Permutation LM (XLNet): masks, target sampling, leak tests, a short run, XLNet parity."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from bert_jax import heads, train
from bert_jax.encoder import EncoderConfig
from bert_jax.model import PretrainModel
import objectives
from objectives.masking import MaskingConfig
from objectives.plm import PermutationLM
from tests.conftest import tiny_config
from tests.test_train import SPECIAL, random_batch

TINY = EncoderConfig(vocab_size=512, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=64, hidden_dropout=0.0,
                     attention_dropout=0.0, initializer_range=0.5)  # large: visible effects


def plm_objective(max_predictions=8, head_transform=True, **masking):
  masking = MaskingConfig(**dict(dict(rate=1 / 6, max_predictions=max_predictions,
                                      mask_prob=0.0, random_prob=0.0, span="ngram",
                                      max_ngram=5), **masking))
  return PermutationLM(masking, SPECIAL, head_transform=head_transform)


def corrupted(obj, batch, seed=0):
  return jax.tree.map(np.asarray, jax.jit(lambda b, k: objectives.corrupt_one(obj, b, k)[1])(
      batch, jax.random.PRNGKey(seed)))


def test_masks_follow_the_factorization_order():
  b = corrupted(plm_objective(), random_batch(0, 8, 48))
  for i in range(8):
    real = b["attention_mask"][i] > 0
    order, target = b["plm_order"][i], b["plm_target"][i]
    content, query = b["plm_content_mask"][i], b["plm_query_mask"][i]
    pos, w = b["plm_positions"][i], b["plm_weights"][i] > 0
    assert target.sum() == w.sum() > 0 and set(np.flatnonzero(target)) == set(pos[w])
    assert not target[~real].any() and not target[0]  # never [CLS] or padding
    # Targets are ordered 0..T-1 after every non-target (order -1).
    assert sorted(order[target]) == list(range(target.sum())) and (order[~target] == -1).all()
    assert content.diagonal().all()  # content includes itself
    assert not content[:, ~real][~np.eye(len(real), dtype=bool)[:, ~real]].any()  # no padding
    ctx = real & ~target
    assert content[np.ix_(ctx, ctx)].all()  # non-targets see each other...
    assert content[:, ctx].all() or not ctx.any()  # ... and are visible to all
    assert not content[np.ix_(ctx, target)].any()  # ... but see no target
    expected = (order[None] <= order[:, None]) & real[None]
    np.testing.assert_array_equal(content, expected | np.eye(len(real), dtype=bool))
    q = query[w]  # the query stream's rows, one per target slot
    assert not q[np.arange(w.sum()), pos[w]].any()  # never itself
    np.testing.assert_array_equal(q, (order[None] < order[pos[w], None]) & real[None])
    assert query.any(axis=1).all()  # no empty attention row, even in unused slots
    np.testing.assert_array_equal(b["plm_ids"][i][w], b["input_ids"][i][pos[w]])
  np.testing.assert_array_equal(b["input_ids"], random_batch(0, 8, 48)["input_ids"])


def test_target_fraction_and_span_lengths():
  n, length = 64, 240
  batch = random_batch(1, n, length)
  batch["attention_mask"][:] = 1  # full sequences: every position but the ends is a candidate
  batch["word_ids"] = np.tile(np.arange(length, dtype=np.int32), (n, 1))
  batch["word_ids"][:, [0, -1]] = -1
  b = corrupted(plm_objective(max_predictions=64), batch)
  target = b["plm_target"]
  np.testing.assert_allclose(target.sum(1), round(length / 6))
  # Runs of consecutive targets: spans (adjacent spans merge, so runs are a little longer).
  runs = []
  for row in target.astype(np.int8):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
    runs += list(edges[1::2] - edges[::2])
  hist = np.bincount(runs, minlength=12)[1:6] / len(runs)
  law = (1 / np.arange(1, 6)) / np.sum(1 / np.arange(1, 6))
  assert np.all(np.diff(hist) < 0), hist  # p(n) decreasing in n
  np.testing.assert_allclose(hist, law, atol=0.05)
  assert np.mean(np.array(runs) <= 5) > 0.95


def forward_perturbed(cfg, obj, length=24, seed=0):
  """Logits at the prediction slots for one sequence and for copies of it with one token
  changed each (copy k+1 changes token k), under the same permutation."""
  base = random_batch(seed, 1, length)
  base["attention_mask"][:] = 1
  base["input_ids"][0, -1] = SPECIAL.sep
  base["word_ids"][0, -1] = -1
  b = corrupted(obj, base)
  copies = jax.tree.map(lambda x: np.repeat(x, length + 1, axis=0), b)
  for k in range(length):
    copies["input_ids"][k + 1, k] = 5 + (copies["input_ids"][k + 1, k] + 17) % 500
  model = PretrainModel(cfg, (obj,))
  params = model.init(jax.random.PRNGKey(1), copies, deterministic=True)["params"]
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, deterministic=True))(
      params, copies)["plm"])
  loss = np.asarray(heads.softmax_cross_entropy(logits, copies["plm_ids"]))  # [N, P]
  return b, logits, loss


def check_no_leak(b, logits, loss):
  order, positions = b["plm_order"][0], b["plm_positions"][0]
  weights = b["plm_weights"][0] > 0
  assert weights.sum() >= 3
  change = np.abs(logits[1:] - logits[:1]).max(-1)  # [token k, slot p]
  for p in np.flatnonzero(weights):
    t = positions[p]
    later = order >= order[t]  # itself and every later target
    assert change[later, p].max() < 1e-5, (p, t, change[later, p])
    # Every earlier token (context and earlier targets) changes the prediction.
    assert change[~later, p].min() > 1e-3, (p, t, change[~later, p])
    # The loss at the slot (against its original label) likewise.
    assert np.abs(loss[1:, p] - loss[0, p])[later].max() < 1e-5
    assert np.abs(loss[1:, p] - loss[0, p])[~later].max() > 1e-4


def test_prediction_does_not_see_itself_or_later_tokens():
  check_no_leak(*forward_perturbed(TINY, plm_objective()))


def test_short_run_is_finite(tmp_path, bundled_tokenizer):
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), objectives="plm:1.0",
                  train__steps=2, train__eval_every=2, train__checkpoint_every=2)
  summary = train.train_and_evaluate(c, str(tmp_path / "w"))
  assert summary.last_eval and np.isfinite(summary.last_eval["plm/loss"])
  assert 0 < summary.last_eval["plm/loss"] < 10


# ----------------------------------------------------------------------------- XLNet

XLNET_HF = dict(vocab_size=512, d_model=16, n_layer=2, n_head=2, d_inner=32, dropout=0.0,
                initializer_range=0.3, ff_activation="gelu")


def xlnet_batch_raw():
  b = random_batch(3, 4, 24)
  b["segment_ids"][:, 12:] = 1  # two segments: exercises the segment-relative term
  b["segment_ids"] *= b["attention_mask"]
  return b


def xlnet_batch(obj):
  return corrupted(obj, xlnet_batch_raw())


def test_xlnet_encoder_does_not_leak():
  from bert_jax import hf_xlnet
  cfg = hf_xlnet.encoder_config_from_hf(dict(XLNET_HF, initializer_range=0.5))
  check_no_leak(*forward_perturbed(cfg, plm_objective(head_transform=False)))


def perturbed_xlnet(config):
  """A random XLNetLMHeadModel with non-zero biases and LayerNorms, so a swapped one shows."""
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.XLNetLMHeadModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "layer_norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def test_xlnet_parity_import_and_export(tmp_path):
  import torch
  import transformers
  from bert_jax import hf_xlnet
  ref = perturbed_xlnet(transformers.XLNetConfig(**XLNET_HF))
  ref.save_pretrained(tmp_path / "ref")
  imported = hf_xlnet.load(str(tmp_path / "ref"))
  assert imported.groups == ("plm",) and not imported.ignored

  obj = plm_objective(head_transform=False)
  b = xlnet_batch(obj)  # two segments, padding, a random permutation
  inputs = {k: torch.tensor(v) for k, v in hf_xlnet.hf_permutation_inputs(b).items()}
  with torch.no_grad():
    theirs = ref(**inputs).logits.numpy()
  w = b["plm_weights"] > 0
  for impl in ("auto", "explicit"):  # fused attention with a bias; explicit scores
    cfg = dataclasses.replace(imported.config, attention_impl=impl)
    ours = np.asarray(PretrainModel(cfg, (obj,)).apply(
        {"params": imported.params}, b, deterministic=True)["plm"])
    np.testing.assert_allclose(ours[w], theirs[w], atol=1e-4, rtol=0, err_msg=impl)

  hf_xlnet.save_pretrained(str(tmp_path / "out"), imported.config, imported.params)
  back = transformers.XLNetLMHeadModel.from_pretrained(tmp_path / "out").eval()
  ref_state = ref.state_dict()
  for k, v in back.state_dict().items():
    assert torch.equal(v, ref_state[k]), k
  with torch.no_grad():
    np.testing.assert_array_equal(back(**inputs).logits.numpy(), theirs)


def test_xlnet_preset_builds_and_every_parameter_learns():
  import objectives
  from bert_jax import hf_xlnet
  from configs.pretrain import get_config
  for size in ("tiny", "small", "base"):
    c = get_config(f"xlnet,{size}")
    hf_xlnet.check_exportable(EncoderConfig.from_dict(c.model))
    (w,) = objectives.build(c, SPECIAL)
    assert w.objective.name == "plm" and not w.objective.head_transform
  c.unlock()
  c.model.update(dict(vocab_size=512, hidden_size=16, num_heads=2, intermediate_size=32,
                      num_layers=1))
  c.plm.max_predictions = 8
  setup = train.build_setup(c, SPECIAL)
  batch = train.corrupt(setup, xlnet_batch_raw(), jax.random.PRNGKey(0))
  params = nn.meta.unbox(setup.model.init(jax.random.PRNGKey(1), batch,
                                          deterministic=True)["params"])
  grads = jax.jit(jax.grad(lambda p: train.compute_loss(
      p, setup, batch, jax.random.PRNGKey(2), False)[0]))(params)
  norms = {"/".join(k.key for k in path): float(np.abs(g).max())
           for path, g in jax.tree_util.tree_leaves_with_path(grads)}
  assert "encoder/layer_0/attention/seg_embed" in norms and "plm/mask_emb" in norms
  assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms


def test_xlnet_workdir_import_export_round_trip(tmp_path):
  """launch.import_hf / export_hf paths: an XLNetLMHeadModel crosses both ways intact."""
  import torch
  import transformers
  from safetensors.numpy import load_file

  from bert_jax import hf
  cfg = transformers.XLNetConfig(vocab_size=99, d_model=32, n_layer=2, n_head=4, d_inner=64)
  src = perturbed_xlnet(cfg)
  src.save_pretrained(tmp_path / "src")
  imported = hf.load(str(tmp_path / "src"))
  assert imported.family == "xlnet" and imported.objectives == "plm:1.0"
  hf.import_to_workdir(str(tmp_path / "src"), str(tmp_path / "wd"))
  hf.export_from_workdir(str(tmp_path / "wd"), str(tmp_path / "out"))
  back, info = transformers.XLNetLMHeadModel.from_pretrained(tmp_path / "out",
                                                             output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  a, b = load_file(tmp_path / "src" / "model.safetensors"), load_file(
      tmp_path / "out" / "model.safetensors")
  # The one tied tensor: lm_loss.weight is transformer.word_embedding.weight, stored once.
  tied = {"lm_loss.weight": "transformer.word_embedding.weight"}
  assert set(src.state_dict()) - set(a) == set(tied)
  assert set(a) == set(b), sorted(set(a) ^ set(b))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # ... and every tensor of the reloaded model, the tied decoder included, is the source's.
  src_state, back_state = src.state_dict(), back.state_dict()
  assert set(src_state) == set(back_state)
  for k, v in back_state.items():
    assert torch.equal(v, src_state[k]), k
  for k, target in tied.items():
    assert torch.equal(back_state[k], back_state[target]), k
