"""Parity with transformers' PyTorch models, family by family, and bit-exact round trips.

Every reference model is a tiny random transformers model built from a config here (no
downloads), with every parameter perturbed so that LayerNorm scales and biases are not
their trivial initial values. The batch has padding and two segments.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import load_file, save_file  # noqa: E402

from bert_jax import hf  # noqa: E402

TOL = 1e-4
VOCAB = 99
BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, attn_implementation="eager")


def _electra(**kw):
  return transformers.ElectraConfig(**dict(BERT_LIKE, embedding_size=16, **kw))


# name: (config factory, transformers class, {our output: HF output}, pooler attribute)
SPECS = {
    "bert": (lambda: transformers.BertConfig(**BERT_LIKE), "BertForPreTraining",
             {"mlm": "prediction_logits", "nsp": "seq_relationship_logits"}, "bert"),
    "bert_base": (lambda: transformers.BertConfig(**BERT_LIKE), "BertModel", {}, ""),
    "roberta": (lambda: transformers.RobertaConfig(
        **dict(BERT_LIKE, type_vocab_size=1, pad_token_id=1, max_position_embeddings=42,
               hidden_act="gelu_new", layer_norm_eps=1e-5)),
                "RobertaForMaskedLM", {"mlm": "logits"}, None),
    "roberta_base": (lambda: transformers.RobertaConfig(  # HF's default: 2 token types
        **dict(BERT_LIKE, pad_token_id=1, max_position_embeddings=42)),
                     "RobertaModel", {}, ""),
    "electra": (_electra, "ElectraForPreTraining", {"rtd": "logits"}, None),
    "electra_generator": (_electra, "ElectraForMaskedLM", {"mlm": "logits"}, None),
    "albert": (lambda: transformers.AlbertConfig(
        **dict(BERT_LIKE, num_hidden_layers=4, num_hidden_groups=2, embedding_size=16)),
               "AlbertForPreTraining", {"mlm": "prediction_logits", "sop": "sop_logits"},
               "albert"),
    "distilbert": (lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
        max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
        attn_implementation="eager"), "DistilBertForMaskedLM", {"mlm": "logits"}, None),
}


def build_hf(name: str, path: str, seed: int = 0):
  """A tiny random transformers model of SPECS[name], saved to `path`."""
  make_config, cls_name, _, _ = SPECS[name]
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(make_config()).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def make_batch(pad_id: int, batch: int = 3, length: int = 12, seed: int = 0):
  """Ids avoiding the special ids, right padding of different lengths, two segments."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(5, VOCAB, (batch, length))
  lengths = np.array([length, 8, 5])[:batch]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
  segments = ((np.arange(length)[None] >= (lengths[:, None] // 2)) & (mask > 0)).astype(np.int64)
  ids[:, 0] = 2
  ids[mask == 0] = pad_id
  return ids, segments, mask


def hf_forward(model, ids, segments, mask):
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  if model.config.model_type != "distilbert":
    kwargs["token_type_ids"] = torch.tensor(segments)
  with torch.no_grad():
    return model(**kwargs), kwargs


def max_diff(a, b) -> float:
  a = np.asarray(a)
  b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parity_and_round_trip(name, tmp_path):
  src, out = str(tmp_path / "hf"), str(tmp_path / "export")
  model = build_hf(name, src)
  _, cls_name, head_outputs, pooler_attr = SPECS[name]
  pad_id = model.config.pad_token_id if model.config.model_type == "roberta" else 0
  ids, segments, mask = make_batch(pad_id)
  if getattr(model.config, "type_vocab_size", 2) < 2:  # e.g. RoBERTa as released
    segments = np.zeros_like(segments)
  ref, kwargs = hf_forward(model, ids, segments, mask)

  imported = hf.load(src)
  assert imported.architecture == cls_name
  ours = imported.model.apply({"params": imported.params}, ids, segments, mask)

  # Every layer's hidden states (embedding output first), the last one, every head.
  hidden_ref = ref.hidden_states if hasattr(ref, "hidden_states") else None
  assert len(ours["all_hidden_states"]) == len(hidden_ref) == imported.config.num_layers + 1
  for i, (a, b) in enumerate(zip(ours["all_hidden_states"], hidden_ref)):
    assert max_diff(a, b) < TOL, f"hidden states {i}"
  assert max_diff(ours["hidden_states"], hidden_ref[-1]) < TOL
  for ours_key, ref_key in head_outputs.items():
    assert max_diff(ours[ours_key], getattr(ref, ref_key)) < TOL, ours_key
  if pooler_attr is not None:
    base = getattr(model, pooler_attr) if pooler_attr else model
    with torch.no_grad():
      pooled = base(**{k: v for k, v in kwargs.items() if k != "output_hidden_states"})
    assert max_diff(ours["pooled"], pooled.pooler_output) < TOL
  else:
    assert "pooled" not in ours

  # The encoder alone, as from_pretrained returns it.
  encoder, params = hf.from_pretrained(src)
  final = encoder.apply({"params": params}, ids, segments, mask, deterministic=True)
  assert max_diff(final["hidden_states"], hidden_ref[-1]) < TOL

  # Export gives back the same tensors, bit for bit, and loads cleanly in transformers.
  hf.save_pretrained(out, imported.family, imported.config, imported.params,
                     base_config=imported.hf_config)
  before, after = load_file(os.path.join(src, "model.safetensors")), load_file(
      os.path.join(out, "model.safetensors"))
  assert sorted(before) == sorted(after)
  for k in before:
    assert before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k]), k
  reloaded, info = getattr(transformers, cls_name).from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  # AutoModel: the same report as for the original directory (the heads are unexpected
  # there too; a *ForMaskedLM has no pooler, so AutoModel initialises one).
  _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  _, info_src = transformers.AutoModel.from_pretrained(src, output_loading_info=True)
  assert info == info_src
  assert not info["missing_keys"] or cls_name.endswith("ForMaskedLM"), info
  original = model.state_dict()
  for k, v in reloaded.state_dict().items():
    assert torch.equal(v, original[k]), k


def test_base_model_export_has_no_heads(tmp_path):
  """heads_mode="none": an encoder-only directory AutoModel loads with no report at all;
  the pooler comes from the NSP head."""
  src, out = str(tmp_path / "hf"), str(tmp_path / "export")
  model = build_hf("bert", src)
  imported = hf.load(src)
  written = hf.save_pretrained(out, "bert", imported.config, imported.params, heads_mode="none")
  assert written["architectures"] == ["BertModel"]
  auto, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  ids, segments, mask = make_batch(0)
  kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(segments))
  with torch.no_grad():
    assert max_diff(auto.eval()(**kwargs).pooler_output, model.bert(**kwargs).pooler_output) < TOL


def test_pytorch_bin_checkpoint(tmp_path):
  src = str(tmp_path / "hf")
  model = build_hf("bert_base", src)
  os.remove(os.path.join(src, "model.safetensors"))
  torch.save(model.state_dict(), os.path.join(src, "pytorch_model.bin"))
  imported = hf.load(src)
  assert imported.groups == ("pooler",)
  ids, segments, mask = make_batch(0)
  ref, _ = hf_forward(model, ids, segments, mask)
  ours = imported.model.apply({"params": imported.params}, ids, segments, mask)
  assert max_diff(ours["hidden_states"], ref.last_hidden_state) < TOL


# ----------------------------------------------------------------------------- errors


def test_unsupported_model_type(tmp_path):
  src = str(tmp_path / "hf")
  build_hf("bert_base", src)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  config["model_type"] = "gpt2"
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*albert, bert, "
                                       r"distilbert, electra, mobilebert, roberta"):
    hf.load(src)


def test_missing_weight(tmp_path):
  src = str(tmp_path / "hf")
  build_hf("bert", src)
  path = os.path.join(src, "model.safetensors")
  state = load_file(path)
  del state["bert.encoder.layer.1.output.dense.weight"]
  save_file(state, path)
  with pytest.raises(KeyError, match=r"bert.encoder.layer.1.output.dense.weight.*"
                                     r"encoder/layer_1/ffn/output/kernel"):
    hf.load(src)


def test_shape_mismatch(tmp_path):
  src = str(tmp_path / "hf")
  build_hf("bert", src)
  path = os.path.join(src, "model.safetensors")
  state = load_file(path)
  state["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((48, 32), np.float32)
  save_file(state, path)
  with pytest.raises(ValueError, match=r"shape mismatch for 'bert.encoder.layer.0.intermediate"
                                       r".dense.weight'.*\(48, 32\).*\(64, 32\)"):
    hf.load(src)


def test_unsupported_config_option(tmp_path):
  src = str(tmp_path / "hf")
  build_hf("bert_base", src)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  config["position_embedding_type"] = "relative_key"
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    hf.load(src)


def test_unexportable_encoder_options_are_named():
  from bert_jax.encoder import EncoderConfig
  cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, pre_layer_norm=True, num_layer_groups=1)
  with pytest.raises(ValueError, match=r"cannot export to bert: pre_layer_norm=True.*"
                                       r"num_layer_groups=1 \(only ALBERT"):
    hf.export_state_dict("bert", cfg, {})
  with pytest.raises(ValueError, match="type_vocab_size=2 .DistilBERT has no token types"):
    hf.export_state_dict("distilbert", EncoderConfig(), {})
