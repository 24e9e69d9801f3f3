"""ELECTRA replaced-token detection: parity with transformers on an imported generator +
discriminator pair, gradient flow, labels, Gumbel-max sampling, and a short run exported.

The reference pair is tiny and random, built here (no downloads): a discriminator
(ElectraForPreTraining) and a generator (ElectraForMaskedLM) at 1/4 of its width, same
depth and embedding width, with the generator's embedding tables and LayerNorm copied from
the discriminator's, as ELECTRA ties them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import load_file, save_file  # noqa: E402

from bert_jax import checkpoint, hf, run_config, train  # noqa: E402
from bert_jax.model import PretrainModel  # noqa: E402
import objectives  # noqa: E402
from objectives.base import SpecialIds  # noqa: E402
from objectives.masking import MaskingConfig  # noqa: E402
from objectives.rtd import ReplacedTokenDetection, discriminator_loss, gumbel_sample  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

TOL = 1e-4
VOCAB = 99
SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=VOCAB)
COMMON = dict(vocab_size=VOCAB, embedding_size=16, num_hidden_layers=2,
              max_position_embeddings=40, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, attn_implementation="eager")
DISC = dict(COMMON, hidden_size=32, num_attention_heads=4, intermediate_size=64)
GEN = dict(COMMON, hidden_size=8, num_attention_heads=1, intermediate_size=16)  # 1/4
SHARED = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")


def perturb(model, seed):
  """LayerNorms and biases away from 1 and 0, so that a wrong mapping shows."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def build_pair(disc_dir: str, gen_dir: str):
  torch.manual_seed(0)
  disc = perturb(transformers.ElectraForPreTraining(transformers.ElectraConfig(**DISC)), 1)
  gen = perturb(transformers.ElectraForMaskedLM(transformers.ElectraConfig(**GEN)), 2)
  with torch.no_grad():  # ELECTRA ties the tables (and the tied decoder follows)
    for name in SHARED:
      getattr(gen.electra.embeddings, name).load_state_dict(
          getattr(disc.electra.embeddings, name).state_dict())
  disc.save_pretrained(disc_dir)
  gen.save_pretrained(gen_dir)
  return disc, gen


def make_batch(seed: int, token: int | None = None, batch: int = 4, length: int = 24):
  """Right-padded ids with two segments; with `token`, about half the ids are that token."""
  rng = np.random.default_rng(seed)
  lengths = np.array([length, 20, 15, 11])[:batch]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(SPECIAL.first_regular, VOCAB, (batch, length))
  if token is not None:
    ids = np.where(rng.random(ids.shape) < 0.5, token, ids)
  ids = (ids * mask).astype(np.int32)
  rows = np.arange(batch)
  ids[:, 0], ids[rows, lengths - 1] = SPECIAL.cls, SPECIAL.sep
  segments = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask > 0)).astype(np.int32)
  word_ids = np.where(mask > 0, np.arange(length)[None], -1).astype(np.int32)
  word_ids[:, 0], word_ids[rows, lengths - 1] = -1, -1
  return {"input_ids": ids, "segment_ids": segments, "attention_mask": mask,
          "word_ids": word_ids, "example_id": rows.astype(np.int32) + 100 * seed}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  root = tmp_path_factory.mktemp("electra")
  disc_dir, gen_dir = str(root / "disc"), str(root / "gen")
  disc, gen = build_pair(disc_dir, gen_dir)
  imported = hf.load_electra_pair(disc_dir, gen_dir)
  g = imported.generator
  objective = ReplacedTokenDetection(
      masking=MaskingConfig(rate=0.15, max_predictions=8, mask_prob=0.85, random_prob=0.0),
      special=SPECIAL, generator_size=g["generator_size"], generator_layers=g["generator_layers"])
  model = PretrainModel(imported.config, (objective,))
  corrupt = jax.jit(lambda b, k: objectives.corrupt_one(objective, b, k)[1])
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True)["rtd"])
  batch = corrupt(make_batch(0), jax.random.PRNGKey(7))
  return types.SimpleNamespace(
      disc=disc, gen=gen, disc_dir=disc_dir, gen_dir=gen_dir, imported=imported,
      objective=objective, model=model, corrupt=corrupt, apply=apply, batch=batch,
      out=apply(imported.params, batch))


def to_np(x):
  return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def close(a, b) -> float:
  a, b = to_np(a), to_np(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def test_pair_imports_into_one_rtd_tree(pair):
  params = pair.imported.params
  assert pair.imported.objectives == "rtd:1.0"
  assert pair.imported.generator["generator_size"] == 0.25
  assert pair.imported.generator["generator_layers"] is None  # the discriminator's depth
  # The generator keeps its projection and layers; the tables live in the encoder only.
  assert set(params["rtd"]["generator"]["embeddings"]) == {"projection"}
  # The tree is exactly what the RTD objective builds (apply would ignore extra weights).
  abstract = jax.eval_shape(lambda: pair.model.init(jax.random.PRNGKey(0), pair.batch,
                                                    deterministic=True))
  want = jax.tree.map(lambda x: x.shape, nn.meta.unbox(abstract["params"]))
  assert jax.tree.map(lambda x: x.shape, params) == want


def test_generator_and_discriminator_match_transformers(pair):
  b, out = jax.tree.map(np.asarray, pair.batch), jax.tree.map(np.asarray, pair.out)
  seg, mask = torch.tensor(b["segment_ids"]), torch.tensor(b["attention_mask"])
  masked = b["mlm_weights"] > 0
  assert masked.sum() >= 8 and (b["input_ids"] != b["original_ids"]).sum() > 0
  with torch.no_grad():
    gen = pair.gen(input_ids=torch.tensor(b["input_ids"]), token_type_ids=seg,
                   attention_mask=mask).logits.numpy()
    disc = pair.disc(input_ids=torch.tensor(out["disc_ids"]), token_type_ids=seg,
                     attention_mask=mask, labels=torch.tensor(out["labels"]))
  gen_at = np.take_along_axis(gen, b["mlm_positions"][..., None], axis=1)
  assert close(out["generator_logits"], gen_at) < TOL
  assert close(out["discriminator_logits"], disc.logits) < TOL
  loss, _ = discriminator_loss(out["discriminator_logits"], out["labels"], b["attention_mask"])
  assert abs(float(loss) - float(disc.loss)) < TOL
  # Some tokens were replaced, so the loss has both classes.
  assert 0 < out["labels"].sum() <= masked.sum()


def test_generator_and_total_losses_match_transformers(pair):
  """The generator's MLM loss, and gen_weight * gen + disc_weight * disc, against
  ElectraForMaskedLM(labels=...).loss and ElectraForPreTraining(labels=...).loss on the same
  imported weights and the same corrupted batch (the generator's samples are ours: the
  discriminator reads our disc_ids). Labels are built here as transformers defines them,
  not taken from our outputs: the generator's are the original ids at the masked positions
  and -100 elsewhere; the discriminator's are 1 where its input differs from the original
  (a correct guess counts as original, as in ELECTRA), padding left out by attention_mask."""
  b, out = jax.tree.map(np.asarray, pair.batch), pair.out
  seg, mask = torch.tensor(b["segment_ids"]), torch.tensor(b["attention_mask"])
  original, disc_ids = b["original_ids"], np.asarray(out["disc_ids"])
  gen_labels = np.where(b["mlm_mask"], original, -100).astype(np.int64)
  disc_labels = (disc_ids != original).astype(np.int64)
  assert (gen_labels >= 0).sum() >= 8 and disc_labels.sum() > 0
  assert (disc_labels[b["attention_mask"] == 0] == 0).all()  # what transformers drops
  with torch.no_grad():
    gen_ref = float(pair.gen(input_ids=torch.tensor(b["input_ids"]), token_type_ids=seg,
                             attention_mask=mask, labels=torch.tensor(gen_labels)).loss)
    disc_ref = float(pair.disc(input_ids=torch.tensor(disc_ids), token_type_ids=seg,
                               attention_mask=mask, labels=torch.tensor(disc_labels)).loss)

  _, metrics = pair.objective.loss(out, pair.batch)
  total, count = (float(x) for x in metrics["gen_loss"])
  assert count == (gen_labels >= 0).sum()
  assert abs(total / count - gen_ref) < 1e-5, (total / count, gen_ref)
  total, count = (float(x) for x in metrics["disc_loss"])
  assert count == b["attention_mask"].sum()
  assert abs(total / count - disc_ref) < 1e-5, (total / count, disc_ref)
  # The weighted total, with the default weights (1, 50) and with others, so that a swap or
  # a dropped term shows; the generator alone through the objective's own weighting too.
  for gen_weight, disc_weight in ((1.0, 50.0), (0.7, 13.0), (1.0, 0.0)):
    objective = dataclasses.replace(pair.objective, gen_weight=gen_weight,
                                    disc_weight=disc_weight)
    loss, _ = objective.loss(out, pair.batch)
    want = gen_weight * gen_ref + disc_weight * disc_ref
    assert abs(float(loss) - want) < 1e-5 * max(1.0, abs(want)), (gen_weight, disc_weight,
                                                                 float(loss), want)


def test_labels_mark_only_real_replacements(pair):
  b, out = pair.batch, pair.out
  original, mask = np.asarray(b["original_ids"]), np.asarray(b["attention_mask"])
  disc_ids, labels = np.asarray(out["disc_ids"]), np.asarray(out["labels"])
  np.testing.assert_array_equal(labels, (disc_ids != original) & (mask > 0))
  np.testing.assert_array_equal(disc_ids[~np.asarray(b["mlm_mask"])],
                                original[~np.asarray(b["mlm_mask"])])
  _, metrics = pair.objective.loss(out, b)
  replaced, tokens = (float(x) for x in metrics["replaced_fraction"])
  assert tokens == mask.sum()
  assert 0 < replaced / tokens <= np.asarray(b["mlm_weights"]).sum() / tokens

  # A generator that always proposes token t: masked positions whose original is t are
  # correct guesses and count as original (label 0), the others as replaced.
  t = 17
  params = jax.tree.map(lambda x: x, pair.imported.params)
  head = dict(params["rtd"]["generator_head"])
  head["bias"] = jnp.asarray(head["bias"]).at[t].add(1e4)
  params["rtd"] = dict(params["rtd"], generator_head=head)
  batch = pair.corrupt(make_batch(1, token=t), jax.random.PRNGKey(3))
  out = pair.apply(params, batch)
  where = np.asarray(batch["mlm_mask"])
  original = np.asarray(batch["original_ids"])[where]
  assert np.all(np.asarray(out["disc_ids"])[where] == t)
  np.testing.assert_array_equal(np.asarray(out["labels"])[where], original != t)
  assert (original == t).any() and (original != t).any()


def test_gradients_flow_as_in_electra(pair):
  params = pair.imported.params
  gen_only = dataclasses.replace(pair.objective, disc_weight=0.0)
  disc_only = dataclasses.replace(pair.objective, gen_weight=0.0)

  def losses(p):  # one forward pass, each loss alone by the objective's own weighting
    out = pair.model.apply({"params": p}, pair.batch, deterministic=True)["rtd"]
    return jnp.stack([o.loss(out, pair.batch)[0] for o in (gen_only, disc_only)])

  jac = jax.jit(jax.jacrev(losses))(params)
  g_gen, g_disc = (jax.tree.map(lambda x, i=i: x[i], jac) for i in (0, 1))
  norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))  # noqa: E731
  # The samples are under stop_gradient: the discriminator loss never reaches the generator.
  assert norm(g_disc["rtd"]["generator"]) == 0 and norm(g_disc["rtd"]["generator_head"]) == 0
  assert norm(g_disc["rtd"]["discriminator_head"]) > 0
  # ... and the generator loss reaches neither the discriminator's layers nor its head.
  assert norm(g_gen["rtd"]["discriminator_head"]) == 0 and norm(g_gen["encoder"]["layer_0"]) == 0
  assert norm(g_gen["rtd"]["generator"]) > 0
  # The shared tables learn from both losses.
  for g in (g_gen, g_disc):
    assert norm(g["encoder"]["embeddings"]["word_embeddings"]) > 0
    assert norm(g["encoder"]["embeddings"]["layer_norm"]) > 0


def test_gumbel_max_samples_the_tempered_softmax():
  logits = jnp.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
  n = 20_000
  for temperature in (1.0, 0.5):
    draws = gumbel_sample(jax.random.PRNGKey(0), jnp.broadcast_to(logits, (n, 6)), temperature)
    observed = np.bincount(np.asarray(draws), minlength=6)
    expected = n * np.asarray(jax.nn.softmax(logits / temperature))
    chi2 = np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-9))
    assert chi2 < 25, (temperature, observed, expected)  # df 5: p(chi2 > 25) ~ 1e-4


def test_pair_with_untied_embeddings_is_refused(pair, tmp_path):
  gen_dir = str(tmp_path / "gen")
  shutil.copytree(pair.gen_dir, gen_dir)
  weights = load_file(os.path.join(gen_dir, "model.safetensors"))
  key = "electra.embeddings.LayerNorm.weight"
  weights[key] = weights[key] + 1
  save_file(weights, os.path.join(gen_dir, "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.UnsupportedError, match="embeddings/layer_norm"):
    hf.load_electra_pair(pair.disc_dir, gen_dir)
  with pytest.raises(hf.UnsupportedError, match="ElectraForMaskedLM"):
    hf.load_electra_pair(pair.disc_dir, pair.disc_dir)


def test_short_run_exports_both_towers(tmp_path, bundled_tokenizer):
  wd, disc_out, gen_out = tmp_path / "run", str(tmp_path / "disc"), str(tmp_path / "gen")
  config = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), objectives="rtd:1.0",
                       family="electra", model__embedding_size=16, train__steps=2,
                       train__batch_size=8, train__eval_batches=1, mesh__data=1)
  summary = train.train_and_evaluate(config, str(wd))
  assert summary.steps == 2 and np.isfinite(summary.last_eval["loss"]), summary.last_eval
  assert 0 < summary.last_eval["rtd/replaced_fraction"] < 0.2, summary.last_eval
  params, step = checkpoint.restore_params(str(wd))
  assert step == 2

  s = hf.export_from_workdir(str(wd), disc_out)
  assert s["architecture"] == "ElectraForPreTraining"
  _, info = transformers.ElectraForPreTraining.from_pretrained(disc_out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  s = hf.export_from_workdir(str(wd), gen_out, tower="generator")
  assert s["architecture"] == "ElectraForMaskedLM"
  model, info = transformers.ElectraForMaskedLM.from_pretrained(gen_out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert model.config.hidden_size == 8 and model.config.embedding_size == 16

  # The two directories are an ELECTRA pair again: importing them gives back the run's
  # tree bit for bit, and a workdir whose config builds the same generator.
  back = hf.load_electra_pair(disc_out, gen_out)
  flat_a, flat_b = hf._flatten(back.params), hf._flatten(jax.tree.map(np.asarray, params))
  assert sorted(flat_a) == sorted(flat_b)
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
  hf.import_to_workdir(disc_out, str(tmp_path / "imported"), generator_dir=gen_out)
  imported_config = run_config.load(str(tmp_path / "imported"))
  assert imported_config.objectives == "rtd:1.0"
  assert imported_config.rtd.generator_size == 0.25


def test_detection_auc_counts_correctly_ranked_pairs_over_non_pad_tokens():
  """Against the definition: over every (replaced, original) pair of non-pad tokens, the
  share where the replaced token scores higher; pads (some with high scores) are ignored."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 24)).astype(np.float32)
  labels = (rng.random((4, 24)) < 0.2).astype(np.int32)
  mask = np.ones((4, 24), np.int32)
  mask[1, 15:] = 0
  mask[3, 5:] = 0
  logits[mask == 0] = 50.0  # would win every pair if pads counted
  labels[1, 20] = 1  # a "replaced" pad must not count either
  valid = mask > 0
  pos, neg = logits[valid & (labels == 1)], logits[valid & (labels == 0)]
  want = (pos[:, None] > neg[None, :]).mean()
  _, metrics = discriminator_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  right, pairs = metrics["disc_auc"]
  assert int(pairs) == pos.size * neg.size
  assert abs(float(right) / float(pairs) - want) < 1e-6
  # A perfect and an inverted discriminator.
  for sign, auc in ((1.0, 1.0), (-1.0, 0.0)):
    ordered = np.where(labels == 1, sign * 5.0, -sign * 5.0) + 0.01 * logits
    right, pairs = discriminator_loss(jnp.asarray(ordered), jnp.asarray(labels),
                                      jnp.asarray(mask))[1]["disc_auc"]
    assert float(right) / float(pairs) == auc
