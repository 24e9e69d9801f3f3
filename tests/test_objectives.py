"""The objective contract: registry, weighted combination, incompatible choices."""

import jax
import numpy as np
import pytest

import objectives
from bert_jax import train
from objectives.base import SpecialIds
from tests.conftest import tiny_config

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=512)


def test_registry_and_spec_parsing():
  assert {"mlm", "nsp", "sop"} <= set(objectives.available())
  assert objectives.parse_spec("mlm:1.0, sop:0.5") == [("mlm", 1.0), ("sop", 0.5)]
  assert objectives.parse_spec("mlm") == [("mlm", 1.0)]
  with pytest.raises(ValueError, match="unknown objective 'mlmm'.*available"):
    objectives.get("mlmm")
  with pytest.raises(ValueError, match="bad weight"):
    objectives.parse_spec("mlm:x")
  with pytest.raises(ValueError, match="listed twice"):
    objectives.parse_spec("mlm,mlm:2")


def test_two_sentence_level_objectives_are_refused():
  c = tiny_config("unused", objectives="mlm:1.0,nsp:1.0,sop:1.0")
  with pytest.raises(ValueError, match="need different kinds of examples"):
    objectives.build(c, SPECIAL)


def test_pair_objective_needs_document_boundaries(tmp_path, bundled_tokenizer):
  f = tmp_path / "plain.txt"
  f.write_text("\n".join(f"line number {i} of a file without documents." for i in range(400)))
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), objectives="mlm:1.0,sop:1.0",
                  data__source="text", data__train_files=str(f), data__eval_files=str(f),
                  data__text_format="plain")
  with pytest.raises(ValueError, match="document boundaries"):
    train.train_and_evaluate(c, str(tmp_path / "w"))


def weighted_loss(weights: str):
  c = tiny_config("unused", objectives=weights)
  setup = train.build_setup(c, SPECIAL)
  batch = train.dummy_batch(4, 64, "nsp")
  batch["input_ids"] = np.random.default_rng(0).integers(5, 512, (4, 64)).astype(np.int32)
  batch["sentence_label"] = np.array([0, 1, 1, 0], np.int32)
  batch = train.corrupt(setup, jax.tree.map(np.asarray, batch), jax.random.PRNGKey(0))
  params = setup.model.init(jax.random.PRNGKey(1), batch, deterministic=True)["params"]
  return train.compute_loss(params, setup, batch, jax.random.PRNGKey(2), True)


def test_weighted_sum_and_separate_metrics():
  total, m = weighted_loss("mlm:1.0,nsp:0.5")
  mlm = m["mlm/loss"][0] / m["mlm/loss"][1]
  nsp = m["nsp/loss"][0] / m["nsp/loss"][1]
  # mlm's loss divides by (sum of weights + 1e-5), its metric by the count: equal to 1e-6.
  np.testing.assert_allclose(float(total), float(mlm + 0.5 * nsp), rtol=1e-5)
  assert set(m) >= {"loss", "mlm/loss", "mlm/accuracy", "nsp/loss", "nsp/accuracy"}
  assert 0.0 <= float(m["nsp/accuracy"][0] / m["nsp/accuracy"][1]) <= 1.0
