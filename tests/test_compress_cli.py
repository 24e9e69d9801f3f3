"""launch.compress on a tiny fine-tuned workdir: int8, QAT, heads, layers; the workdir it
writes is an init for fine-tuning and exports to transformers; clear errors (exit 2)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bert_jax.compress import run, workdir as wd
from bert_jax.finetune import loop, restore
from tests.conftest import REPO
from tests.test_finetune_run import ft_config, pretrained  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):  # noqa: F811
  out = str(tmp_path_factory.mktemp("ft"))
  c = ft_config(pretrained, steps=2)
  c.optim.lr = 1e-3
  loop.finetune(c, out, quiet=True)
  return out


def cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "launch.compress", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_int8_and_qat(finetuned, tmp_path):
  rec = run.compress(finetuned, str(tmp_path / "int8"), "int8", calibration_batches=2)
  assert rec["original"]["dev"]["accuracy"] == pytest.approx(
      json.load(open(os.path.join(finetuned, "results.json")))["best"]["accuracy"], abs=1e-6)
  assert abs(rec["compressed"]["dev"]["accuracy"] - rec["original"]["dev"]["accuracy"]) <= 0.13
  assert rec["int8_bytes"] < rec["checkpoint_bytes"]
  with np.load(rec["int8_file"]) as f:
    assert f["encoder/layer_0/ffn/intermediate/kernel/array/qvalue"].dtype == np.int8
  # QAT: the run's fine-tuning again with quant.mode=qat, then converted
  q = run.compress(finetuned, str(tmp_path / "qat"), "qat", calibration_batches=2)
  qat_cfg = json.load(open(tmp_path / "qat" / "qat_finetune" / "config.json"))
  assert qat_cfg["quant"]["mode"] == "qat" and "accuracy" in q["qat_fake_quant_dev"]
  assert "accuracy" in q["compressed"]["dev"]


def test_heads_layers_reload_and_export(finetuned, tmp_path):
  out = str(tmp_path / "heads")
  rec = run.compress(finetuned, out, "heads:0.5", importance_batches=2)
  assert rec["compressed"]["heads"] == 4 and rec["original"]["heads"] == 8
  assert rec["compressed"]["parameters"] < rec["original"]["parameters"]
  init = restore.load_init(ft_config(out))  # an init for fine-tuning, pruned
  assert sum(init.encoder_config.layer_heads(i) for i in range(2)) == 4
  # the dev score recorded is what the pruned model scores when reloaded
  ft = wd.load_finetuned(out)
  data = wd.TaskData(ft)
  again, _ = data.dev_scores(wd.float_apply(wd.task_model(ft.cfg, ft.config, data.n_out)),
                             ft.params)
  assert again["accuracy"] == pytest.approx(rec["compressed"]["dev"]["accuracy"])
  # launch.predict reads the compressed workdir: its dev rows predict what it recorded
  from bert_jax.finetune import predict
  dev = [json.loads(line) for line in open(os.path.join(out, "predictions_dev.jsonl"))]
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in dev))
  got = predict.predict_file(out, str(rows), str(tmp_path / "pred.jsonl")).rows
  assert [g["label"] for g in got] == [d["predicted_name"] for d in dev]
  # export: transformers loads it and computes our pruned encoder's states
  from bert_jax import checkpoint, hf
  params, _ = checkpoint.restore_params(out)
  try:  # the launch.export_hf path (its tokenizer conversion needs a matching protobuf)
    s = hf.export_from_workdir(out, str(tmp_path / "hf"), which="latest")
    assert s["architecture"] == "BertModel"
  except Exception as e:  # noqa: BLE001  (google.protobuf VersionError: the environment)
    if "Protobuf" not in str(e):
      raise
    cfg, params, extra = hf._finetuned_for_export(out, None, jax.tree.map(np.asarray, params))
    hf.save_pretrained(str(tmp_path / "hf"), "bert", cfg, params, base_config=extra)
  import torch
  import transformers
  m = transformers.BertModel.from_pretrained(str(tmp_path / "hf")).eval()
  assert json.load(open(tmp_path / "hf" / "config.json"))["bert_jax_pruned_heads"]
  b = data.train_batches(1, 4)[0]
  from bert_jax.encoder import Encoder
  ours = np.asarray(Encoder(ft.cfg).apply({"params": ft.params["encoder"]}, b["input_ids"],
                                          b["segment_ids"], b["attention_mask"])
                    ["hidden_states"])
  with torch.no_grad():
    t = lambda x: torch.tensor(np.asarray(x, np.int64))  # noqa: E731
    theirs = m(input_ids=t(b["input_ids"]), attention_mask=t(b["attention_mask"]),
               token_type_ids=t(b["segment_ids"])).last_hidden_state.numpy()
  keep = b["attention_mask"][..., None].astype(bool)
  np.testing.assert_allclose(np.where(keep, theirs, 0), np.where(keep, ours, 0), atol=1e-4,
                             rtol=1e-4)
  # layers, then fine-tuned again (1 epoch of the 32 examples)
  lay = run.compress(finetuned, str(tmp_path / "layers"), "layers:top:1",
                     finetune_epochs=1.0)
  assert lay["dropped_layers"] == [1] and lay["compressed"]["num_layers"] == 1
  assert restore.load_init(ft_config(str(tmp_path / "layers"))).encoder_config.num_layers == 1


def test_cli(finetuned, tmp_path):
  r = cli(f"--workdir={finetuned}", f"--out={tmp_path / 'l'}", "--method=layers:0")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "dev accuracy   original" in r.stdout and "compressed" in r.stdout, r.stdout
  for args, msg in (
      ([f"--workdir={finetuned}", "--method=int4"], "is not one of int8, qat"),
      ([f"--workdir={finetuned}", "--method=heads:1.5"], "head fraction"),
      ([f"--workdir={finetuned}", "--method=layers:0,1"], "cannot drop all 2"),
      ([f"--workdir={tmp_path}", "--method=int8"], "not a fine-tuned workdir")):
    r = cli(*args, f"--out={tmp_path / 'x'}")
    assert r.returncode == 2, (args, r.stderr[-2000:])
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
