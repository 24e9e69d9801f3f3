"""Hugging Face checkpoints through workdirs: the import/export CLIs, tokenizers, and a
checkpoint pretrained by our own loop exported and checked in transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import torch
import transformers
from safetensors.numpy import load_file  # noqa: E402

from bert_jax import checkpoint, hf, run_config, train  # noqa: E402
from bert_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from bert_jax.encoder import EncoderConfig  # noqa: E402
from tests.conftest import REPO, tiny_config  # noqa: E402
from tests.test_hf_parity import build_hf, make_batch, max_diff  # noqa: E402

TOL = 1e-4
WORDS = ["the", "and", "of", "to", "in", "he", "that", "lord", "shall", "unto", "god",
         "earth", "heaven", "beginning", "created", "##s", "##ed", "light", "day", "night"]
SENTENCES = ["In the beginning God created the heaven and the earth.",
             "And God called the light Day, and the darkness he called Night.",
             "And the evening and the morning were the first day."]


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_import_and_export_clis_with_wordpiece_tokenizer(tmp_path):
  src, wd, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
  build_hf("bert", str(src))
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
  transformers.BertTokenizer(vocab_file=str(vocab)).save_pretrained(str(src))

  r = run_module("launch.import_hf", f"--hf_dir={src}", f"--workdir={wd}")
  assert "BertForPreTraining" in r.stdout and "mlm, nsp" in r.stdout
  config = run_config.load(str(wd))
  assert config.family == "bert" and config.objectives == "mlm:1.0,nsp:1.0"
  assert config.model.hidden_size == 32 and config.model.num_layers == 3
  assert config.data.tokenizer == str(wd / "hf" / "tokenizer.json")
  assert (wd / "hf" / "config.json").is_file()
  params, step = checkpoint.restore_params(str(wd))
  assert step == 0 and sorted(params) == ["encoder", "mlm", "nsp"]
  imported = hf.load(str(src))
  restored, expected = hf._flatten(params), hf._flatten(imported.params)
  assert sorted(restored) == sorted(expected)
  assert all(np.array_equal(restored[k], expected[k]) for k in expected)
  assert EncoderConfig.from_dict(config.model) == imported.config

  r = run_module("launch.export_hf", f"--workdir={wd}", f"--out={out}")
  assert "BertForPreTraining" in r.stdout
  before = load_file(str(src / "model.safetensors"))
  after = load_file(str(out / "model.safetensors"))
  assert sorted(before) == sorted(after)
  assert all(np.array_equal(before[k], after[k]) for k in before)
  a = transformers.AutoTokenizer.from_pretrained(str(src))
  b = transformers.AutoTokenizer.from_pretrained(str(out))
  assert a(SENTENCES, SENTENCES)["input_ids"] == b(SENTENCES, SENTENCES)["input_ids"]


def test_sentencepiece_tokenizer_is_given_to_our_pipeline(tmp_path, bundled_tokenizer):
  """An ALBERT-style spiece.model becomes WORKDIR/tokenizer.model for our data pipeline."""
  src, wd = tmp_path / "hf", tmp_path / "run"
  build_hf("albert", str(src))
  shutil.copyfile(bundled_tokenizer, src / "spiece.model")
  summary = hf.import_to_workdir(str(src), str(wd))
  assert summary["heads"] == ("mlm", "sop") and "spiece.model" in summary["tokenizer"]
  tok = tokenizer_lib.load_tokenizer(str(wd / "tokenizer.model"))
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  config = run_config.load(str(wd))
  assert config.family == "albert" and config.model.num_layer_groups == 2
  assert config.model.embedding_size == 16 and config.data.tokenizer == ""
  # An unknown model type is refused before anything is written.
  with open(src / "config.json") as f:
    hf_config = json.load(f)
  hf_config["model_type"] = "gpt2"
  with open(src / "config.json", "w") as f:
    json.dump(hf_config, f)
  with pytest.raises(ValueError, match="unsupported model_type .gpt2."):
    hf.import_to_workdir(str(src), str(tmp_path / "other"))
  assert not (tmp_path / "other").exists()


def check_tokenizer_round_trip(tok, out_dir):
  """The exported tokenizer encodes like ours, with [CLS] A [SEP] B [SEP] around it."""
  auto = transformers.AutoTokenizer.from_pretrained(out_dir)
  assert (auto.pad_token_id, auto.unk_token_id, auto.cls_token_id, auto.sep_token_id,
          auto.mask_token_id) == (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)
  from bert_jax.data import bundled
  docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
  texts = SENTENCES + [s for d in docs[:20] for s in d][:300]
  for text, ids in zip(texts, auto(texts)["input_ids"], strict=True):
    assert ids == [tok.cls_id, *tok.encode(text), tok.sep_id], text
  pair = auto(SENTENCES[0], SENTENCES[1])
  assert pair["input_ids"] == [tok.cls_id, *tok.encode(SENTENCES[0]), tok.sep_id,
                               *tok.encode(SENTENCES[1]), tok.sep_id]
  assert sum(pair["token_type_ids"]) == len(tok.encode(SENTENCES[1])) + 1
  return auto


def test_checkpoint_pretrained_by_our_loop_exports(tmp_path, bundled_tokenizer):
  """A few steps of the tiny preset (shrunk), exported: transformers gives our numbers."""
  wd, out = tmp_path / "run", tmp_path / "export"
  config = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), train__steps=2)
  train.train_and_evaluate(config, str(wd))
  summary = hf.export_from_workdir(str(wd), str(out))
  assert summary["step"] == 2 and summary["architecture"] == "BertForMaskedLM"

  model, info = transformers.BertForMaskedLM.from_pretrained(str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  # MLM alone trains no pooler: AutoModel without one misses nothing (the MLM head's
  # weights are reported unexpected there, as for every BERT checkpoint with heads).
  _, info = transformers.AutoModel.from_pretrained(str(out), add_pooling_layer=False,
                                                   output_loading_info=True)
  assert not info["missing_keys"] and not info["mismatched_keys"], info
  assert all(k.startswith("cls.predictions.") for k in info["unexpected_keys"]), info

  tok = tokenizer_lib.load_tokenizer(str(wd / "tokenizer.model"))
  auto = check_tokenizer_round_trip(tok, str(out))
  enc = auto(SENTENCES, padding=True, return_tensors="np")
  ids, mask, segments = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
  assert mask.min() == 0  # padding present

  params, _ = checkpoint.restore_params(str(wd))
  cfg = EncoderConfig.from_dict(config.model)
  ours = hf.PretrainingModel(cfg, (("mlm", "mlm"),)).apply(
      {"params": {k: params[k] for k in ("encoder", "mlm")}}, ids, segments, mask)
  with torch.no_grad():
    ref = model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(segments), output_hidden_states=True)
  for a, b in zip(ours["all_hidden_states"], ref.hidden_states, strict=True):
    assert max_diff(a, b) < TOL
  assert max_diff(ours["mlm"], ref.logits) < TOL


def test_own_roberta_checkpoint_exports_with_shifted_positions(tmp_path, bundled_tokenizer):
  """Our RoBERTa preset counts positions from 0; transformers' from pad_token_id + 1."""
  wd, out = tmp_path / "run", tmp_path / "export"
  config = tiny_config(bundled_tokenizer)
  config.family = "roberta"
  config.model.update(dict(type_vocab_size=1, layer_norm_eps=1e-5))
  cfg = EncoderConfig.from_dict(config.model)
  assert cfg.position_offset == 0
  ids, _, mask = make_batch(pad_id=0, length=12)
  model = hf.PretrainingModel(cfg, (("mlm", "mlm"),))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, None, mask)["params"]
  rng = np.random.RandomState(1)  # LayerNorms and biases away from 1 and 0
  params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32),
                        nn.meta.unbox(params))
  os.makedirs(wd)
  run_config.save(config, str(wd))
  shutil.copyfile(bundled_tokenizer, wd / "tokenizer.model")
  ckpt = checkpoint.Checkpointer(str(wd), async_save=False)
  ckpt.save(0, {"step": 0, "params": params}, None, force=True)
  ckpt.close()

  summary = hf.export_from_workdir(str(wd), str(out))
  assert summary["architecture"] == "RobertaForMaskedLM"
  hf_model, info = transformers.RobertaForMaskedLM.from_pretrained(
      str(out), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert hf_model.config.pad_token_id == 0
  assert hf_model.config.max_position_embeddings == cfg.max_position_embeddings + 1

  ours = model.apply({"params": params}, ids, None, mask)
  final = ours["hidden_states"]
  with torch.no_grad():
    ref = hf_model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          output_hidden_states=True)
  real = mask.astype(bool)  # padding sits at other positions in the two numberings
  assert max_diff(np.asarray(final)[real], ref.hidden_states[-1].numpy()[real]) < TOL
  assert max_diff(np.asarray(ours["mlm"])[real], ref.logits.numpy()[real]) < TOL
