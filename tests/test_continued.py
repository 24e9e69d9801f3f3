"""Continued pretraining (`init_from`) from our own run and from an imported Hugging Face
checkpoint on local text, and two-stage fine-tuning from a fine-tuned workdir."""

import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import hf, metrics as metrics_lib, train
from bert_jax.finetune import loop, restore
from tests.conftest import tiny_config
from tests.test_finetune_run import ft_config


def evals(workdir):
  return {r["step"]: r for r in metrics_lib.read_metrics(str(workdir)) if r["split"] == "eval"}


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_continued_pretraining_starts_where_the_run_ended(reference_run, tmp_path):
  config, reference = reference_run
  c = tiny_config("")  # no tokenizer, and the wrong width: both come from init_from
  c.model.hidden_size = 48
  c.data.cache_dir = config.data.cache_dir
  c.init_from = reference
  c.train.update(dict(steps=2, eval_every=2))
  summary = train.train_and_evaluate(c, str(tmp_path / "more"))
  first, ref_last = evals(tmp_path / "more")[0], evals(reference)[max(evals(reference))]
  # Step 0 of the new run evaluates the reference's final weights on the same eval data.
  np.testing.assert_allclose(first["mlm/loss"], ref_last["mlm/loss"], rtol=1e-6)
  assert summary.steps == 2
  cfg = train.run_config.load(str(tmp_path / "more"))
  assert cfg.model.hidden_size == config.model.hidden_size  # the checkpoint's architecture
  assert open(tmp_path / "more" / "tokenizer.model", "rb").read() == open(
      os.path.join(reference, "tokenizer.model"), "rb").read()


def test_continued_pretraining_of_an_imported_checkpoint_on_local_text(tmp_path,
                                                                       bundled_tokenizer):
  torch.manual_seed(0)
  cfg = transformers.AlbertConfig(vocab_size=512, embedding_size=16, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
  src = tmp_path / "hf"
  transformers.AlbertForPreTraining(cfg).eval().save_pretrained(src)
  shutil.copyfile(bundled_tokenizer, src / "spiece.model")
  imported = tmp_path / "imported"
  hf.import_to_workdir(str(src), str(imported))
  # Pretraining inside the imported workdir is refused, naming the way to continue.
  c = tiny_config(""); c.init_from = ""  # noqa: E702
  with pytest.raises(ValueError, match="init_from"):
    train.train_and_evaluate(c, str(imported))
  text = tmp_path / "domain.txt"
  lines = [f"The {w} of the court was read in the morning." for w in
           ("order", "ruling", "motion", "finding", "record", "notice")]
  text.write_text("\n".join(lines * 20) + "\n\n" + "\n".join(lines[::-1] * 20) + "\n")
  c = tiny_config("")
  c.data.update(dict(source="text", train_files=str(text), eval_files=str(text),
                     cache_dir=str(tmp_path / "cache")))
  c.init_from = str(imported)
  c.objectives = "mlm:1.0,sop:1.0"
  c.optim.update(dict(lr=0.0, weight_decay=0.0))  # lr 0: the step-1 weights are the imported
  c.train.update(dict(steps=1, eval_every=1, checkpoint_every=1))
  train.train_and_evaluate(c, str(tmp_path / "dapt"))
  got, _ = checkpoint_lib.restore_params(str(tmp_path / "dapt"))
  want, _ = checkpoint_lib.restore_params(str(imported))
  assert_trees_equal(got["encoder"], want["encoder"])
  assert_trees_equal(got["sop"], want["sop"])  # a head both have: loaded too


def test_two_stage_finetuning_starts_from_the_first_stage_best(reference_run, tmp_path):
  _, pretrained = reference_run
  first = str(tmp_path / "stage1")
  c = ft_config(pretrained, steps=2, eval_every=1)
  loop.finetune(c, first, quiet=True)
  best, _ = checkpoint_lib.restore_params(os.path.join(first, "best"))
  for init, which in ((os.path.join(first, "best"), "latest"), (first, "best")):
    c2 = ft_config(init)
    c2.init_which = which
    got = restore.load_init(c2)
    assert_trees_equal(got.encoder_params, best["encoder"])
    assert_trees_equal(got.pooler_params, best["task"]["pooler"])
  summary = loop.finetune(ft_config(os.path.join(first, "best")), str(tmp_path / "stage2"),
                          quiet=True)
  assert summary.steps == 1 and "stage1" in summary.init


def test_task_adaptive_corpus_holds_the_training_texts_only(tmp_path):
  """launch.continued_demo's TAPT corpus: every training verse once (1 in 20 held out for
  the MLM eval), one per document, and no dev verse."""
  import gzip
  import json
  from bert_jax.data import bundled
  from launch import continued_demo

  def texts(split):
    with gzip.open(bundled.task_path(split), "rt", encoding="utf-8") as f:
      return [" ".join(json.loads(line)["text"].split()) for line in f if line.strip()]
  train_path, eval_path = continued_demo.write_task_corpus(str(tmp_path))
  docs = {p: [d for d in open(p, encoding="utf-8").read().split("\n\n") if d.strip()]
          for p in (train_path, eval_path)}
  assert all("\n" not in d.strip() for ds in docs.values() for d in ds)  # one verse each
  got = [d.strip() for ds in docs.values() for d in ds]
  assert sorted(got) == sorted(texts("train"))
  assert len(docs[eval_path]) == len(texts("train")) // continued_demo.HELD_OUT_EVERY
  assert not set(got) & (set(texts("dev")) - set(texts("train")))
