"""Combined pretraining losses equal transformers': MLM+NSP (BERT), MLM+SOP (ALBERT).

Same imported weights, the same batch corrupted by our masking, the labels transformers
expects (-100 outside the masked positions); dropout off.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from bert_jax import hf, train  # noqa: E402
from objectives.base import SpecialIds  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_hf_parity import VOCAB, build_hf, make_batch  # noqa: E402

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=VOCAB)


@pytest.mark.parametrize("name,objectives", [("bert", "mlm:1.0,nsp:1.0"),
                                             ("albert", "mlm:1.0,sop:1.0")])
def test_combined_loss_matches_transformers(name, objectives, tmp_path):
  model = build_hf(name, str(tmp_path))
  imported = hf.load(str(tmp_path))
  config = tiny_config("unused", objectives=objectives)
  fields = dataclasses.asdict(dataclasses.replace(
      imported.config, hidden_dropout=0.0, attention_dropout=0.0))
  config.model.update({k: v for k, v in fields.items() if k in config.model})
  assert train.EncoderConfig.from_dict(config.model) == dataclasses.replace(
      imported.config, hidden_dropout=0.0, attention_dropout=0.0)
  config.mlm.max_predictions = 4
  setup = train.build_setup(config, SPECIAL)

  ids, segments, mask = make_batch(pad_id=0)
  word_ids = np.where((mask > 0) & (np.arange(ids.shape[1]) > 0), np.arange(ids.shape[1]), -1)
  batch = {"input_ids": ids, "segment_ids": segments, "attention_mask": mask,
           "word_ids": word_ids, "example_id": np.arange(3), "epoch": np.zeros(3),
           "sentence_label": np.array([0, 1, 1])}
  batch = train.corrupt(setup, jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), batch),
                        jax.random.PRNGKey(0))
  params = {k: v for k, v in imported.params.items() if k in ("encoder", "mlm", "nsp", "sop")}
  loss, metrics = train.compute_loss(params, setup, batch, jax.random.PRNGKey(1), True)

  labels = np.full(ids.shape, -100)
  batch = setup.objectives.inputs(batch, setup.objectives[0].objective)  # MLM's masked view
  pos, tgt, w = (np.asarray(batch[k]) for k in ("mlm_positions", "mlm_ids", "mlm_weights"))
  for b in range(ids.shape[0]):
    for p, t, wt in zip(pos[b], tgt[b], w[b]):
      if wt > 0:
        labels[b, p] = t
  assert (labels != -100).sum() == w.sum() > 0
  with torch.no_grad():
    out = model(input_ids=torch.tensor(np.asarray(batch["input_ids"]), dtype=torch.long),
                token_type_ids=torch.tensor(segments), attention_mask=torch.tensor(mask),
                labels=torch.tensor(labels),
                **{"next_sentence_label" if name == "bert" else "sentence_order_label":
                   torch.tensor([0, 1, 1])})
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-4, atol=1e-4)
  pair = objectives.split(",")[1].split(":")[0]
  ours_pair = metrics[f"{pair}/loss"][0] / metrics[f"{pair}/loss"][1]
  logits = out.seq_relationship_logits if name == "bert" else out.sop_logits
  ref_pair = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1]))
  np.testing.assert_allclose(float(ours_pair), float(ref_pair), rtol=1e-4, atol=1e-5)
