"""A model with heads pruned exports to transformers (zero-padded heads: transformers 5.x
no longer prunes on load) and matches there; int8 PTQ logits stay close to float32."""

import jax
import numpy as np
import torch
import transformers

from bert_jax import hf
from bert_jax.compress import prune, quantize
from bert_jax.encoder import Encoder
from tests.test_compress_prune import batch, model_and_params

TOL = 1e-4


def test_pruned_export_matches_transformers(tmp_path):
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, attn_implementation="eager")
  ref = transformers.BertModel(config).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  ref.save_pretrained(tmp_path / "ref")
  imported = hf.load(str(tmp_path / "ref"))
  remove = {0: [0, 2], 1: [3], 2: [1, 2, 3]}
  cfg, params = prune.prune_heads(imported.config, imported.params, remove)
  assert [cfg.layer_heads(i) for i in range(3)] == [2, 3, 1]

  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, (2, 11)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  seg = np.zeros_like(ids)
  seg[:, 6:] = 1
  ours = np.asarray(Encoder(cfg).apply({"params": params["encoder"]}, ids, seg, mask)
                    ["hidden_states"])
  # transformers' prune_linear_layer on the reference (the 4.x prune-on-load layout)
  # computes what our physically pruned model computes
  from transformers.pytorch_utils import prune_linear_layer
  slim = transformers.BertModel(config).eval()
  slim.load_state_dict(ref.state_dict())
  for i, heads in remove.items():
    att = slim.encoder.layer[i].attention
    keep = torch.tensor([h * 8 + d for h in range(4) if h not in heads for d in range(8)])
    for name in ("query", "key", "value"):
      setattr(att.self, name, prune_linear_layer(getattr(att.self, name), keep))
    att.output.dense = prune_linear_layer(att.output.dense, keep, dim=1)
  with torch.no_grad():
    t = lambda x: torch.tensor(x)  # noqa: E731
    slim_out = slim(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(seg))
  m = mask[..., None].astype(bool)
  np.testing.assert_allclose(np.where(m, ours, 0), np.where(m, slim_out.last_hidden_state
                                                            .numpy(), 0), atol=TOL, rtol=TOL)

  # export (zero-padded heads) -> BertModel.from_pretrained: the same outputs
  full_cfg, full = prune.pad_pruned_heads(cfg, params)
  assert full_cfg.pruned_heads is None
  hf.save_pretrained(str(tmp_path / "out"), "bert", full_cfg, full, heads_mode="none",
                     base_config={"bert_jax_pruned_heads": {"0": [0, 2]}})
  loaded = transformers.BertModel.from_pretrained(str(tmp_path / "out")).eval()
  with torch.no_grad():
    got = loaded(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(seg))
  np.testing.assert_allclose(np.where(m, got.last_hidden_state.numpy(), 0),
                             np.where(m, ours, 0), atol=TOL, rtol=TOL)
  np.testing.assert_allclose(got.pooler_output.numpy(), slim_out.pooler_output.numpy(),
                             atol=TOL, rtol=TOL)
  # and it imports back to a full-width model with the same function
  back = hf.load(str(tmp_path / "out"))
  again = np.asarray(Encoder(back.config).apply({"params": back.params["encoder"]}, ids, seg,
                                                mask)["hidden_states"])
  np.testing.assert_allclose(np.where(m, again, 0), np.where(m, ours, 0), atol=TOL, rtol=TOL)


def test_int8_logits_close_to_float():
  """int8 weights + static int8 activations: logits within 2% of the float logits' range
  (tiny random model, calibrated on 3 batches, scored on another)."""
  model, params = model_and_params()
  b = batch(n=8, length=16, seed=9)
  calib = [batch(n=8, length=16, seed=s) for s in range(3)]
  qp = quantize.ptq_params(model, params, calib, batch())
  kernel = qp["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]
  assert kernel.array.qvalue.dtype == np.int8
  ref = np.asarray(model.apply({"params": params}, b, deterministic=True)["task"])
  got = np.asarray(quantize.ptq_model(model).apply({"params": qp}, b, deterministic=True)
                   ["task"])
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert 0 < err < 0.02, err
  # weights only (activations float): closer still
  qw = quantize.ptq_params(model, params, calib, batch(), act="none")
  got_w = np.asarray(quantize.ptq_model(model, "none").apply({"params": qw}, b,
                                                             deterministic=True)["task"])
  assert np.abs(got_w - ref).max() / np.abs(ref).max() < 0.01
  # the dequantized weights are what the int8 model multiplies by
  dq = quantize.dequantized(model, qp, params)
  w = dq["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]
  scale = np.asarray(kernel.array.scale)
  np.testing.assert_allclose(w, np.asarray(kernel.array.qvalue) * scale, rtol=1e-6)
  assert len(jax.tree.leaves(dq)) == len(jax.tree.leaves(params))
