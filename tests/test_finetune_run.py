"""Fine-tuning end to end: restoring our pretraining checkpoints, the loop's options, the
errors raised before any compute, and the command line."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bert_jax import checkpoint, run_config, sharding, train
from bert_jax.data import bundled
from bert_jax.finetune import loop, restore
from configs import pretrain
from configs.finetune import get_config
from tests.conftest import REPO, tiny_config

NO_DROPOUT = dict(model__hidden_dropout=0.0, model__attention_dropout=0.0)
SHRINK = dict(vocab_size=512, hidden_size=32, num_heads=4, intermediate_size=64,
              num_layers=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, bundled_tokenizer):
  """Two steps of our own pretraining loop (bert preset: MLM + NSP)."""
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  corpus = tmp_path_factory.mktemp("corpus") / "kjv.txt"
  docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
  corpus.write_text("\n\n".join("\n".join(d) for d in docs[:12]) + "\n")
  c = tiny_config(bundled_tokenizer, train__steps=2, train__eval_batches=1,
                  data__source="text", data__train_files=str(corpus),
                  data__eval_files=str(corpus), mesh__data=1, **NO_DROPOUT)
  c.objectives = "mlm:1.0,nsp:1.0"
  train.train_and_evaluate(c, workdir)
  return workdir


def ft_config(init: str, **train_fields):
  c = get_config("bundled")
  c.init = init
  c.data.update(dict(seq_len=64, dynamic_padding=False))
  c.task.update(dict(max_train_examples=32, max_dev_examples=16))
  c.train.update(dict(dict(batch_size=16, eval_batch_size=16, steps=1, log_every=1),
                      **train_fields))
  c.mesh.data = 1  # one of the 8 simulated devices: compiles faster
  c.model.update(dict(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0))
  return c


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def test_restore_train_and_options(pretrained, tmp_path):
  """Encoder = the checkpoint's, pretraining heads gone; accumulation, layer decay,
  re-initialised top layer, early stopping, best checkpoint, predictions, resume."""
  c = ft_config(pretrained, steps=4, eval_every=1, patience=1, grad_accum=2)
  c.optim.update(dict(lr=0.0, layer_decay=0.5))  # lr 0: the loaded weights stay put
  c.reinit_layers = 1
  out = str(tmp_path / "ft")
  s = loop.finetune(c, out, quiet=True)
  # constant dev scores: the second evaluation is no better -> stop (patience 1)
  assert s.stopped_early and s.steps == 2 and s.best_step == 1
  assert 0.0 <= s.best["accuracy"] <= 1.0 and np.isfinite(s.best["loss"])

  pre, _ = checkpoint.restore_params(pretrained)
  assert {"mlm", "nsp"} <= set(pre)
  ft, step = checkpoint.restore_params(os.path.join(out, loop.BEST_DIR))
  assert step == 1 and set(ft) == {"encoder", "task"}  # no pretraining heads
  assert set(ft["task"]) == {"pooler", "classifier"}
  mine, theirs = flat(ft["encoder"]), flat(pre["encoder"])
  assert set(mine) == set(theirs)
  for k in mine:  # all loaded but the re-initialised top layer
    if not k.startswith("layer_1/"):
      np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    elif k.endswith("kernel"):
      assert not np.array_equal(mine[k], theirs[k]), k
  for k, v in flat(ft["task"]["pooler"]).items():  # NSP's pooler reused
    np.testing.assert_array_equal(v, flat(pre["nsp"]["pooler"])[k])

  rows = [json.loads(line) for line in open(s.predictions_file)]
  assert len(rows) == 16 and {"text", "label", "prediction", "label_name"} <= set(rows[0])
  train_rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))
                if '"train"' in line]
  assert all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in train_rows)
  with open(os.path.join(out, loop.RESULTS_FILE)) as f:
    assert json.load(f)["best_step"] == 1
  again = loop.finetune(c, out, quiet=True)  # resumes: nothing left to do
  assert again.steps == 2 and again.best == s.best
  chained = restore.load_init(ft_config(out))  # a fine-tuned workdir is an init too
  assert chained.step == 2 and chained.pooler_params is not None
  assert chained.encoder_config == restore.load_init(c).encoder_config


def preset_workdir(family: str, tok_path: str, path: str) -> dict:
  """A step-0 checkpoint of the preset's full pretraining state (all heads; distillation
  presets get a bert preset teacher of the same widths)."""
  c = pretrain.get_config(f"{family},tiny")
  c.model.update(SHRINK)
  c.data.update(dict(seq_len=64, tokenizer=tok_path, vocab_size=512))
  c.mlm.max_predictions = 10
  c.mesh.data = 1
  if "distill" in c.objectives:
    c.distill.teacher = path + "_teacher"
    preset_workdir("bert", tok_path, c.distill.teacher)
  from bert_jax.data.tokenizer import load_tokenizer
  setup = train.build_setup(c, train.special_ids(load_tokenizer(tok_path)))
  kind = train.objectives_lib.example_kind(setup.objectives)
  key = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(setup.model.init(
      {"params": key, "dropout": key},
      train.corrupt(setup, jax.tree.map(jax.numpy.asarray, train.dummy_batch(8, 64, kind)),
                    key), deterministic=True)))
  rng = np.random.default_rng(0)  # values do not matter, only that they come back: no compile
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes["params"])
  for w in setup.objectives:  # e.g. the distillation teacher
    params = w.objective.initialize(params)
  os.makedirs(path)
  run_config.save(c, path)
  shutil.copy(tok_path, os.path.join(path, "tokenizer.model"))
  ckpt = checkpoint.Checkpointer(path, keep=1, keep_best=False, async_save=False)
  ckpt.save(0, {"step": np.zeros((), np.int32), "params": params}, None, force=True)
  ckpt.close()
  return jax.device_get(params)


@pytest.mark.parametrize("family", sorted(pretrain.PRESETS))
def test_every_preset_checkpoint_restores(family, bundled_tokenizer, tmp_path):
  path = str(tmp_path / family)
  params = preset_workdir(family, bundled_tokenizer, path)
  c = ft_config(path)
  init = restore.load_init(c)
  setup = loop.build(c, init, 6, 1)
  mesh, rules = sharding.make_mesh(c.mesh), sharding.logical_rules(c.sharding)
  state, _ = loop.initial_state(c, init, setup, loop.dummy_batch("classification", 6, 8, 64),
                                mesh, rules)
  assert set(state.params) == {"encoder", "task"}
  mine, theirs = flat(jax.device_get(state.params["encoder"])), flat(params["encoder"])
  assert set(mine) == set(theirs)
  for k in mine:
    np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)


def test_mismatches_are_clear_errors(pretrained, bundled_tokenizer, tmp_path):
  def variant(name, **model):
    path = tmp_path / name
    shutil.copytree(pretrained, path)
    cfg = run_config.load(str(path))
    cfg.model.update(model)
    run_config.save(cfg, str(path))
    return str(path)

  with pytest.raises(ValueError, match="vocabulary mismatch.*256"):
    restore.load_init(ft_config(variant("small_vocab", vocab_size=256)))
  with pytest.raises(ValueError, match="vocabulary mismatch.*2048"):
    restore.load_init(ft_config(variant("big_vocab", vocab_size=2048)))
  long = ft_config(pretrained)
  long.data.seq_len = 128
  with pytest.raises(ValueError, match="seq_len=128 is longer than the position table.*64"):
    loop.finetune(long, str(tmp_path / "long"))
  with pytest.raises(ValueError, match="does not fit the model.*missing.*layer_2"):
    loop.finetune(ft_config(variant("deeper", num_layers=3)), str(tmp_path / "ft_deeper"))
  with pytest.raises(ValueError, match="needs a tokenizer"):
    restore.load_init(ft_config(""))
  scratch = ft_config("")
  scratch.tokenizer = bundled_tokenizer
  init = restore.load_init(scratch)
  assert init.encoder_params is None and init.encoder_config.vocab_size == 512
  with pytest.raises(FileNotFoundError, match="not a bert-jax workdir"):
    restore.load_init(ft_config(str(tmp_path)))


def test_cli_rejects_unknown_fields(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "launch.finetune", "--config", "configs/finetune.py:bundled",
       "--config.task.main_metrc=f1", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "unknown config field 'task.main_metrc'" in r.stderr + r.stdout
  assert "main_metric" in r.stderr + r.stdout


def _write_jsonl(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


@pytest.mark.parametrize("kind", ["qa"])  # "tagging" runs the same path; ~15 s more
def test_token_level_kinds_run_end_to_end(kind, pretrained, tmp_path):
  """One step and a dev evaluation of a per-token kind (outputs are cut back to each
  feature's length before decoding): SQuAD v2-style QA with long contexts (or BIO tags)."""
  rng = np.random.default_rng(0)
  words = "And Moses went up unto the mount of God in the land of Egypt".split()
  if kind == "qa":
    rows = []
    for i in range(12):
      toks = list(rng.choice(words, 30))
      s = int(rng.integers(0, 27))
      start = len(" ".join(toks[:s])) + (1 if s else 0)
      answer = {"text": [" ".join(toks[s:s + 2])], "answer_start": [start]} if i % 3 else {
          "text": [], "answer_start": []}
      rows.append({"id": f"q{i}", "question": "who went", "context": " ".join(toks),
                   "answers": answer})
    fields = dict(kind="qa", version_2=True, metrics="exact_match,f1", main_metric="f1",
                  doc_stride=8, max_query_len=4)
  else:
    rows = [{"tokens": list(t), "tags": ["B-PER" if w == "Moses" else
                                          "B-LOC" if w == "Egypt" else "O" for w in t]}
            for t in (rng.choice(words, 12) for _ in range(12))]
    fields = dict(kind="tagging", metrics="entity_f1,token_accuracy", main_metric="entity_f1")
  data = _write_jsonl(tmp_path / "data.jsonl", rows)
  c = ft_config(pretrained)
  c.task.update(dict(source="files", train_files=data, dev_files=data, **fields))
  c.data.update(dict(seq_len=32, dynamic_padding=True, pad_multiple=32))
  c.train.update(dict(batch_size=8, eval_batch_size=16))
  s = loop.finetune(c, str(tmp_path / "ft"), quiet=True)
  assert s.steps == 1 and np.isfinite(s.best["loss"])
  rows_out = [json.loads(line) for line in open(s.predictions_file)]
  assert len(rows_out) == 12
  if kind == "qa":
    assert 0 <= s.best["f1"] <= 100 and "no_answer_f1" in s.best
    assert all(r["prediction"] in r_in["context"] for r, r_in in zip(rows_out, rows))
  else:
    assert 0 <= s.best["entity_f1"] <= 1
    assert all(len(r["predicted_tags"]) == len(r["tokens"]) for r in rows_out)


def test_layer_decay_scales_updates_by_depth():
  from bert_jax.encoder import EncoderConfig
  small = dict(vocab_size=10, hidden_size=8, num_heads=2, intermediate_size=8)
  ones = {"encoder": {"embeddings": {"w": np.ones(2)}, "layer_0": {"w": np.ones(2)},
                      "layer_1": {"w": np.ones(2)}},
          "task": {"classifier": {"w": np.ones(2)}}}
  tx = loop.scale_by_layer_depth(EncoderConfig(num_layers=2, **small), 0.5)
  out, _ = tx.update(ones, tx.init(ones))
  got = {k: float(v[0]) for k, v in flat(out).items()}
  assert got == {"encoder/embeddings/w": 0.125, "encoder/layer_0/w": 0.25,
                 "encoder/layer_1/w": 0.5, "task/classifier/w": 1.0}
  # ALBERT: one shared module serves all 4 layers: it moves at the top layer's rate
  albert = EncoderConfig(num_layers=4, num_layer_groups=1, **small)
  assert loop.layer_depth(("encoder", "layer_0"), albert) == 4
  assert loop.layer_depth(("encoder", "embeddings"), albert) == 0
