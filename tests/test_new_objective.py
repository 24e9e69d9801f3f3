"""A new objective defined in this file only (shuffled-token detection: move a random 15% of
the tokens among themselves, classify each token as moved or not) runs alone and beside
MLM through pretraining under a FLOPs budget, an ablation cell with its fine-tuning, the
benchmark and Hugging Face export of its encoder, with no file outside this one edited."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import objectives
from bert_jax import ablate, hf, run_config
from bert_jax.budget import step_flops
from bert_jax.encoder import EncoderConfig
from objectives.base import Objective, SpecialIds, View


@dataclasses.dataclass(frozen=True)
class ShuffleConfig:
  rate: float = 0.15


@dataclasses.dataclass(frozen=True)
class ShuffleView(View):
  """input_ids with `rate` of the real, non-special tokens permuted among themselves."""

  name = "shuffled"
  rate: float
  first_regular: int

  def make(self, clean, key):
    def one(k, ids, mask, example):
      k = jax.random.fold_in(k, example)
      movable = (mask > 0) & (ids >= self.first_regular)
      pick = movable & (jax.random.uniform(jax.random.fold_in(k, 0), ids.shape) < self.rate)
      # The picked positions first, in a random order; each takes the next one's token.
      order = jnp.argsort(jnp.where(pick, jax.random.uniform(k, ids.shape), 2.0))
      n, i = jnp.sum(pick), jnp.arange(ids.shape[0])
      source = order[jnp.where(i < n, (i + 1) % jnp.maximum(n, 1), i)]
      moved = ids.at[order].set(ids[source])
      return moved, (moved != ids).astype(jnp.int32)
    shuffled, labels = jax.vmap(one, in_axes=(None, 0, 0, 0))(
        key, clean["input_ids"], clean["attention_mask"], clean["example_id"])
    return {"input_ids": shuffled, "shuffle_labels": labels}


class DetectionHead(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, encoded, inputs, encoder, *, deterministic):
    del inputs, encoder, deterministic
    return nn.Dense(1, name="dense")(encoded["hidden_states"])[..., 0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class ShuffledTokenDetection(Objective):
  name = "std"
  Config = ShuffleConfig

  shuffle: ShuffleView

  @classmethod
  def from_config(cls, config, special: SpecialIds):
    return cls(ShuffleView(cls.section(config).rate, special.first_regular))

  def view(self):
    return self.shuffle

  def head(self, encoder_config, name):
    return DetectionHead(encoder_config.hidden_size, name=name)

  def loss(self, outputs, inputs):
    w = (inputs["attention_mask"] > 0).astype(jnp.float32)
    y = inputs["shuffle_labels"].astype(jnp.float32)
    ce = jnp.maximum(outputs, 0) - outputs * y + jnp.log1p(jnp.exp(-jnp.abs(outputs)))
    n = jnp.sum(w)
    correct = jnp.sum(((outputs > 0) == (y > 0)) * w)
    return jnp.sum(ce * w) / n, {"loss": (jnp.sum(ce * w), n), "accuracy": (correct, n),
                                 "moved_fraction": (jnp.sum(y * w), n)}


@pytest.fixture(scope="module", autouse=True)
def registered():
  """Registered while this file's tests run only: pytest imports every test file in each
  worker, and a registry holding "std" would give every other test's config a `std`
  section that the subprocesses they launch do not know."""
  objectives.register(ShuffledTokenDetection)
  yield
  objectives.unregister(ShuffledTokenDetection.name)


def test_the_view_moves_about_rate_of_the_tokens():
  view = ShuffleView(0.15, 5)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 500, size=(8, 64)).astype(np.int32)
  mask = np.ones_like(ids)
  out = jax.jit(view.make)({"input_ids": ids, "attention_mask": mask,
                            "example_id": np.arange(8, dtype=np.int32)},
                           jax.random.PRNGKey(0))
  moved = np.asarray(out["shuffle_labels"]).mean()
  assert 0.08 < moved < 0.2, moved
  # A permutation: every row keeps its multiset of tokens.
  np.testing.assert_array_equal(np.sort(np.asarray(out["input_ids"]), 1), np.sort(ids, 1))


def ablation(tokenizer: str, kind: str = "flops"):
  small = ";".join([
      "model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
      "model.vocab_size=512", "data.vocab_size=512", f"data.tokenizer={tokenizer}",
      "data.seq_len=64", "model.max_position_embeddings=64", "mlm.max_predictions=10",
      "train.batch_size=8", "train.eval_every=2", "train.eval_batches=1",
      "train.checkpoint_every=2", "train.log_every=1", "train.async_checkpoint=False",
      "mesh.data=1"])
  c = ml_collections.ConfigDict(dict(
      name="std", seed=0, budget=dict(kind=kind, value=1.0),
      cells={"std": dict(preset="bert,tiny", overrides="objectives=std:1.0"),
             "mlm_std": dict(preset="bert,tiny", overrides="objectives=mlm:1.0,std:1.0")},
      order="std,mlm_std", pretrain_overrides=small,
      finetune=dict(tasks="bundled", seeds="0",
                    overrides="train.steps=2;train.eval_every=2;train.batch_size=8;"
                              "train.eval_batch_size=8;data.seq_len=32")))
  return c


@pytest.mark.slow
def test_new_objective_runs_everywhere(tmp_path, bundled_tokenizer):
  abl = ablation(bundled_tokenizer)
  # The budget: three steps of the objective alone, in XLA's count of the compiled step.
  alone, _ = ablate.pretrain_config(abl, "std", str(tmp_path))
  abl.budget.value = 3 * step_flops(alone)
  results = ablate.run_ablation(abl, str(tmp_path), log=lambda s: None)
  by_name = {r.name: r for r in results}
  assert [by_name[n].status for n in ("std", "mlm_std")] == ["done", "done"], results
  assert by_name["std"].steps == 3 and 1 <= by_name["mlm_std"].steps < 3  # MLM costs FLOPs
  for name in ("std", "mlm_std"):
    r = by_name[name]
    assert 0 < r.budget_spent <= abl.budget.value * 1.5
    assert np.isfinite(r.pretrain["std/loss"]) and 0 < r.pretrain["std/moved_fraction"] < 0.3
    assert len(r.scores["bundled"]) == 1 and 0 <= r.scores["bundled"][0] <= 1
  assert "mlm/loss" in by_name["mlm_std"].pretrain
  wd = os.path.join(ablate.cell_dir(str(tmp_path), "mlm_std"), "pretrain")
  assert run_config.load(wd).objectives == "mlm:1.0,std:1.0"

  # The benchmark times any registered objective (no PyTorch peer for this one).
  from launch import benchmark
  config, _ = ablate.pretrain_config(abl, "mlm_std", str(tmp_path))
  result = benchmark.run(config, steps=2, warmup=1, round_steps=1, log=lambda s: None)
  assert result["ours"]["tokens_per_s"] > 0
  assert result["ours"]["xla_flops_per_device_step"] > 0

  # Export of its encoder: transformers' model gives our encoder's hidden states.
  out = str(tmp_path / "hf")
  hf.export_from_workdir(wd, out)
  ref = transformers.AutoModel.from_pretrained(out).eval()
  from bert_jax import checkpoint
  from bert_jax.encoder import Encoder
  params, _ = checkpoint.restore_params(wd)
  cfg = EncoderConfig.from_dict(run_config.load(wd).model)
  ids = np.random.default_rng(0).integers(5, 500, size=(2, 16)).astype(np.int32)
  ours = Encoder(cfg).apply({"params": params["encoder"]}, ids)["hidden_states"]
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long)).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["hidden_size"] == 32
