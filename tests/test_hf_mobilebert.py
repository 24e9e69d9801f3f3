"""MobileBERT as options of the shared encoder: parity with transformers' PyTorch
MobileBertForPreTraining / MobileBertForMaskedLM / MobileBertModel across its options,
bit-exact round trips, a checkpoint pretrained by our own loop exported, and the
mobilebert preset's layer-wise distillation.

Reference models are tiny random transformers models built here (no downloads), every
parameter perturbed (NoNorm and LayerNorm away from 1 and 0); fp32; the batch of
tests/test_hf_parity.py (padding, two segments).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import load_file, save_file  # noqa: E402

from bert_jax import checkpoint, hf, run_config, train  # noqa: E402
from bert_jax import metrics as metrics_lib  # noqa: E402
from bert_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from bert_jax.encoder import EncoderConfig  # noqa: E402
from configs.pretrain import get_config  # noqa: E402
from tests import test_distill  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402
from tests.test_hf_parity import TOL, VOCAB, make_batch, max_diff  # noqa: E402
from tests.test_hf_workdir import SENTENCES, check_tokenizer_round_trip  # noqa: E402

TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=24, embedding_size=16, intra_bottleneck_size=16,
            max_position_embeddings=40, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, attn_implementation="eager")
# name: (config options, transformers class)
SPECS = {
    # The published layout: NoNorm, trigrams, a shared key/query bottleneck, stacked FFNs.
    "published": (dict(num_feedforward_networks=3), "MobileBertForPreTraining"),
    # LayerNorm, plain word inputs, q/k/v from the input bottleneck, a pooler without
    # weights (classifier_activation=False) under NSP.
    "bottleneck_attention": (dict(normalization_type="layer_norm", trigram_input=False,
                                  use_bottleneck_attention=True,
                                  key_query_shared_bottleneck=False,
                                  num_feedforward_networks=1, classifier_activation=False,
                                  hidden_act="gelu"), "MobileBertForPreTraining"),
    # Queries, keys and values from the layer input (intra width = hidden), base model.
    "input_attention": (dict(normalization_type="layer_norm", trigram_input=False,
                             key_query_shared_bottleneck=False, intra_bottleneck_size=32,
                             num_feedforward_networks=2), "MobileBertModel"),
    # No bottleneck, embeddings as wide as hidden: transformers keeps an unused
    # embedding_transformation and a [0, vocab] output matrix.
    "no_bottleneck": (dict(use_bottleneck=False, embedding_size=32, trigram_input=False,
                           num_feedforward_networks=2), "MobileBertForMaskedLM"),
}


def build(name: str, path: str, seed: int = 0):
  options, cls_name = SPECS[name]
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(
      transformers.MobileBertConfig(**dict(TINY, **options))).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def forward(model, ids, segments, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(segments), output_hidden_states=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parity_and_round_trip(name, tmp_path):
  src, out = str(tmp_path / "hf"), str(tmp_path / "export")
  model = build(name, src)
  cls_name = SPECS[name][1]
  ids, segments, mask = make_batch(0)
  ref = forward(model, ids, segments, mask)

  imported = hf.load(src)
  assert imported.family == "mobilebert" and imported.architecture == cls_name
  ours = imported.model.apply({"params": imported.params}, ids, segments, mask)
  assert len(ours["all_hidden_states"]) == len(ref.hidden_states) == 3
  for i, (a, b) in enumerate(zip(ours["all_hidden_states"], ref.hidden_states)):
    assert max_diff(a, b) < TOL, f"hidden states {i}"
  if cls_name == "MobileBertForPreTraining":
    assert max_diff(ours["mlm"], ref.prediction_logits) < TOL
    assert max_diff(ours["nsp"], ref.seq_relationship_logits) < TOL
  if cls_name == "MobileBertForMaskedLM":
    assert max_diff(ours["mlm"], ref.logits) < TOL
  if cls_name != "MobileBertForMaskedLM":  # which has no pooler
    base = model if cls_name == "MobileBertModel" else model.mobilebert
    assert max_diff(ours["pooled"], forward(base, ids, segments, mask).pooler_output) < TOL
  encoder, params = hf.from_pretrained(src)
  final = encoder.apply({"params": params}, ids, segments, mask, deterministic=True)
  assert max_diff(final["hidden_states"], ref.hidden_states[-1]) < TOL

  # Export: the same tensors bit for bit (weights transformers builds but never uses here
  # are not imported, and exported as zeros); both classes load it with nothing missing.
  hf.save_pretrained(out, "mobilebert", imported.config, imported.params,
                     base_config=imported.hf_config)
  before = load_file(os.path.join(src, "model.safetensors"))
  after = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(before) == sorted(after)
  for k in before:
    expected = np.zeros_like(before[k]) if k in imported.ignored else before[k]
    assert np.array_equal(expected, after[k]), k
  assert bool(imported.ignored) == (name == "no_bottleneck"), imported.ignored
  reloaded, info = getattr(transformers, cls_name).from_pretrained(
      out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert max_diff(ours["hidden_states"],
                  forward(reloaded.eval(), ids, segments, mask).hidden_states[-1]) < TOL
  # AutoModel: the same report as for the original directory (heads unexpected; a
  # *ForMaskedLM has no pooler, so AutoModel initialises one).
  _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  _, info_src = transformers.AutoModel.from_pretrained(src, output_loading_info=True)
  assert info == info_src
  assert not info["missing_keys"] or cls_name == "MobileBertForMaskedLM", info


def test_workdir_import_and_export(tmp_path):
  """What launch.import_hf / launch.export_hf run: a workdir with the mobilebert preset's
  config and the MLM + NSP objectives, exported back bit for bit."""
  src, wd, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
  build("published", str(src))
  summary = hf.import_to_workdir(str(src), str(wd))
  assert summary["heads"] == ("mlm", "nsp")
  config = run_config.load(str(wd))
  assert config.family == "mobilebert" and config.objectives == "mlm:1.0,nsp:1.0"
  assert EncoderConfig.from_dict(config.model) == hf.load(str(src)).config
  assert hf.export_from_workdir(str(wd), str(out))["architecture"] == "MobileBertForPreTraining"
  before = load_file(str(src / "model.safetensors"))
  after = load_file(str(out / "model.safetensors"))
  assert sorted(before) == sorted(after)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_unused_key_query_bottleneck_is_not_imported(tmp_path):
  """use_bottleneck_attention with key_query_shared_bottleneck: transformers builds the
  key/query bottleneck and never uses it; we import without it and export without it."""
  src, out = str(tmp_path / "hf"), str(tmp_path / "export")
  options = dict(SPECS["bottleneck_attention"][0], key_query_shared_bottleneck=True)
  torch.manual_seed(0)
  model = transformers.MobileBertForPreTraining(
      transformers.MobileBertConfig(**dict(TINY, **options))).eval()
  model.save_pretrained(src)
  imported = hf.load(src)
  assert not imported.config.key_query_shared_bottleneck
  assert imported.ignored and all(".bottleneck.attention." in k for k in imported.ignored)
  ids, segments, mask = make_batch(0)
  ours = imported.model.apply({"params": imported.params}, ids, segments, mask)
  assert max_diff(ours["mlm"], forward(model, ids, segments, mask).prediction_logits) < TOL
  written = hf.save_pretrained(out, "mobilebert", imported.config, imported.params)
  assert not written["key_query_shared_bottleneck"]
  _, info = transformers.MobileBertForPreTraining.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_errors_name_the_problem(tmp_path):
  src = str(tmp_path / "hf")
  build("published", src)
  path = os.path.join(src, "model.safetensors")
  state = load_file(path)
  key = "mobilebert.encoder.layer.1.bottleneck.input.dense.weight"
  state[key] = np.zeros((8, 32), np.float32)
  save_file(state, path)
  with pytest.raises(ValueError, match=rf"shape mismatch for '{key}'.*\(8, 32\).*\(16, 32\)"):
    hf.load(src)
  # Queries from the layer input through a query projection of the bottleneck's width:
  # transformers itself cannot run that.
  with pytest.raises(ValueError, match="intra_bottleneck_size=16 must equal hidden_size=32"):
    hf.encoder_config_from_hf(dict(TINY, model_type="mobilebert",
                                   key_query_shared_bottleneck=False))
  # MobileBERT's options export only as mobilebert, and need its embedding layout.
  cfg = EncoderConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=24, intra_bottleneck_size=16,
                      key_query_shared_bottleneck=True)
  with pytest.raises(ValueError, match="cannot export to bert: MobileBERT options"):
    hf.export_state_dict("bert", cfg, {})
  with pytest.raises(ValueError, match="cannot export to mobilebert: project_word_embeddings"):
    hf.export_state_dict("mobilebert", cfg, {})


# ----------------------------------------------------------------------------- our runs


def mobilebert_run(tokenizer: str, cache: str, **model):
  """tiny_config's data and schedule (2 steps) with the mobilebert,tiny preset's model,
  objective and distillation settings; `model` overrides the preset's widths."""
  c = tiny_config(tokenizer, cache, train__steps=2)
  preset = get_config("mobilebert,tiny")
  with c.unlocked():
    c.family, c.objectives, c.distill, c.model = (
        preset.family, preset.objectives, preset.distill, preset.model)
  c.model.update(dict(vocab_size=512, max_position_embeddings=64, **model))
  c.data.seq_len = 32
  c.mesh.data = 1
  return c


def test_checkpoint_pretrained_by_our_loop_exports(tmp_path, bundled_tokenizer):
  """MLM + NSP with the MobileBERT encoder for 2 steps: MobileBertForPreTraining gives our
  hidden states and logits."""
  wd, out = tmp_path / "run", tmp_path / "export"
  config = mobilebert_run(bundled_tokenizer, str(tmp_path / "cache"), hidden_size=32,
                          embedding_size=8, intra_bottleneck_size=16, intermediate_size=32,
                          num_layers=2, num_feedforward_networks=2)
  config.objectives = "mlm:1.0,nsp:1.0"
  train.train_and_evaluate(config, str(wd))
  summary = hf.export_from_workdir(str(wd), str(out))
  assert summary["step"] == 2 and summary["architecture"] == "MobileBertForPreTraining"
  model, info = transformers.MobileBertForPreTraining.from_pretrained(
      str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

  auto = check_tokenizer_round_trip(tokenizer_lib.load_tokenizer(str(wd / "tokenizer.model")),
                                    str(out))
  enc = auto(SENTENCES, SENTENCES[::-1], padding=True, return_tensors="np")
  ids, mask, segments = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
  assert mask.min() == 0 and segments.max() == 1
  params, _ = checkpoint.restore_params(str(wd))
  ours = hf.PretrainingModel(EncoderConfig.from_dict(config.model),
                             (("mlm", "mlm"), ("nsp", "pair"))).apply(
      {"params": {k: params[k] for k in ("encoder", "mlm", "nsp")}}, ids, segments, mask)
  ref = forward(model.eval(), ids, segments, mask)
  for a, b in zip(ours["all_hidden_states"], ref.hidden_states, strict=True):
    assert max_diff(a, b) < TOL
  assert max_diff(ours["mlm"], ref.prediction_logits) < TOL
  assert max_diff(ours["nsp"], ref.seq_relationship_logits) < TOL


def test_preset_distils_layer_by_layer_from_a_matching_teacher(tmp_path, bundled_tokenizer):
  """The mobilebert,tiny preset (2 layers here) learns from a BERT teacher of its width,
  heads and depth: two progressive stages, finite losses; a head-count mismatch is an
  error that names both."""
  teacher_hf, teacher_wd = str(tmp_path / "teacher_hf"), str(tmp_path / "teacher")
  student = mobilebert_run(bundled_tokenizer, str(tmp_path / "cache"), num_layers=2)
  width = dict(hidden_size=student.model.hidden_size, num_hidden_layers=2,
               num_attention_heads=student.model.num_heads)
  test_distill.build_hf(dict(test_distill.COMMON, vocab_size=512, max_position_embeddings=64,
                             intermediate_size=64, **width), teacher_hf, seed=0)
  hf.import_to_workdir(teacher_hf, teacher_wd)
  student.distill.update(dict(teacher=teacher_wd, stage_steps=1))
  student.train.update(dict(batch_size=8, eval_batches=1))

  wrong = mobilebert_run(bundled_tokenizer, "", num_layers=2, num_heads=2)
  wrong.distill.teacher = teacher_wd
  special = dataclasses.replace(test_distill.SPECIAL, vocab_size=512)
  with pytest.raises(ValueError, match="student's num_heads 2 must equal the teacher's 4"):
    train.build_setup(wrong, special)

  summary = train.train_and_evaluate(student, str(tmp_path / "student"))
  ev = summary.last_eval
  for k in ("hidden_loss", "attention_loss", "kl_loss", "mlm_loss"):
    assert np.isfinite(ev[f"distill/{k}"]), k
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "student")) if r["split"] == "train"]
  assert [r["distill/stage"] for r in rows] == [0, 1]
  assert all(np.isfinite(r["loss"]) for r in rows)
