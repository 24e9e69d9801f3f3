"""The training loop: mesh equivalence, exact resume, the CLI, and errors before compute."""

import functools
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bert_jax import metrics as metrics_lib
from bert_jax import sharding, train
from objectives.base import SpecialIds
from tests.conftest import REPO, times_logged, tiny_config, train_losses

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5, vocab_size=512)


def random_batch(seed: int, batch: int = 16, length: int = 64):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(length // 2, length + 1, size=batch)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, 512, size=(batch, length)).astype(np.int32) * mask
  ids[:, 0] = 2
  ids[np.arange(batch), lengths - 1] = 3
  word_ids = np.where(mask == 1, np.arange(length)[None], -1).astype(np.int32)
  word_ids[:, 0] = -1
  word_ids[np.arange(batch), lengths - 1] = -1
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids), "attention_mask": mask,
          "word_ids": word_ids, "example_id": np.arange(batch, dtype=np.int32) + 100 * seed,
          "epoch": np.zeros(batch, np.int32)}


def run_steps(mesh_shape, mode="fsdp", steps=3, grad_accum=1):
  c = tiny_config("unused")
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  c.sharding.mode = mode
  c.train.grad_accum = grad_accum
  setup = train.build_setup(c, SPECIAL)
  mesh = sharding.make_mesh(c.mesh)
  rules = sharding.logical_rules(c.sharding)
  state, shardings = train.init_state(setup, 0, train.dummy_batch(16, 64, "single"), mesh, rules)
  bs = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    step = jax.jit(functools.partial(train.train_step, setup=setup),
                   in_shardings=(shardings, bs), out_shardings=(shardings, None),
                   donate_argnums=(0,))
    losses = []
    for i in range(steps):
      # One batch again and again (fresh masks each step): the loss must fall.
      state, m = step(state, train.to_global(random_batch(0), bs))
      losses.append(float(m["loss"][0] / m["loss"][1]))
  return np.array(losses), state


def test_meshes_give_the_same_losses():
  assert jax.device_count() == 8
  base, base_state = run_steps((1, 1, 1))
  assert np.all(np.isfinite(base)) and base[-1] < base[0]
  for shape in [(8, 1, 1), (2, 2, 2), (2, 1, 4)]:
    losses, state = run_steps(shape)
    np.testing.assert_allclose(losses, base, rtol=2e-5, err_msg=str(shape))
    w = state.params["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]
    np.testing.assert_allclose(np.asarray(w), np.asarray(
        base_state.params["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]), atol=2e-6)
  # Parameters really are split on the tensor axis under (2, 1, 4).
  _, state = run_steps((2, 1, 4), steps=1)
  w = state.params["encoder"]["layer_0"]["ffn"]["intermediate"]["kernel"]
  assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len({str(s.index) for s in w.addressable_shards}) == 4


@pytest.mark.slow  # tests/test_fast_paths.py covers the modes and accumulation more cheaply
def test_sharding_modes_match():
  base, _ = run_steps((2, 2, 2), mode="fsdp")
  np.testing.assert_allclose(run_steps((2, 2, 2), mode="data")[0], base, rtol=2e-5)
  # (Gradient accumulation: tests/test_fast_paths.py, exactly.)


@pytest.mark.parametrize("field,value", [("log_every", 0), ("eval_every", 0),
                                         ("checkpoint_every", 0), ("steps", -1)])
def test_bad_cadences_are_reported(field, value):
  c = tiny_config("unused")
  c.train[field] = value
  with pytest.raises(ValueError, match=f"train.{field} must be >= "):
    train.build_setup(c, SPECIAL)


def test_bad_mesh_and_batch_are_reported():
  c = tiny_config("unused")
  c.mesh.update(dict(data=16, fsdp=1, tensor=1))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(c.mesh)
  c.mesh.update(dict(data=-1, fsdp=3, tensor=1))
  with pytest.raises(ValueError, match="does not divide"):
    sharding.make_mesh(c.mesh)


def test_resume_matches_uninterrupted_run(tmp_path, reference_run):
  config, reference = reference_run
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_after=3)
  assert sorted(train_losses(tmp_path / "resumed")) == [1, 2, 3]
  summary = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  a, b = train_losses(reference), train_losses(tmp_path / "resumed")
  assert sorted(a) == sorted(b) == list(range(1, 7))
  assert [a[s] for s in a] == [b[s] for s in a]  # bit-identical on CPU
  assert times_logged(tmp_path / "resumed") == {s: 1 for s in range(1, 7)}  # not restarted
  assert summary.last_eval is not None and os.path.exists(summary.plot)


def test_incompatible_workdir_and_vocab_are_rejected(tmp_path, bundled_tokenizer):
  cache = str(tmp_path / "cache")
  c = tiny_config(bundled_tokenizer, cache, train__steps=1)
  train.train_and_evaluate(c, str(tmp_path / "w"))
  other = tiny_config(bundled_tokenizer, cache, train__steps=1, model__hidden_size=64)
  with pytest.raises(ValueError, match="incompatible config.*model.hidden_size"):
    train.train_and_evaluate(other, str(tmp_path / "w"))
  wrong_vocab = tiny_config(bundled_tokenizer, cache, model__vocab_size=1000)
  with pytest.raises(ValueError, match="does not match the tokenizer"):
    train.train_and_evaluate(wrong_vocab, str(tmp_path / "v"))
  bad_batch = tiny_config(bundled_tokenizer, cache, train__batch_size=12)
  with pytest.raises(ValueError, match="must be divisible by the 8 devices"):
    train.train_and_evaluate(bad_batch, str(tmp_path / "b"))


def test_empty_and_missing_corpus_are_reported(tmp_path, bundled_tokenizer):
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"\n\n")
  for files, message in ((str(empty), "No text"), (str(tmp_path / "missing*.txt"), "missing")):
    c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), data__source="text",
                    data__train_files=files, data__eval_files=files)
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(c, str(tmp_path / "w"))


def test_non_utf8_lines_are_skipped_and_counted(tmp_path, bundled_tokenizer):
  from bert_jax.data import bundled
  docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
  text = "\n\n".join("\n".join(d) for d in docs).encode()
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(text.replace(b"\n\n", b"\n\xff\xfe broken line\n\n", 3))
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), data__source="text",
                  data__train_files=str(corpus), data__eval_files=str(corpus), train__steps=2)
  summary = train.train_and_evaluate(c, str(tmp_path / "w"))
  assert summary.last_eval and np.isfinite(summary.last_eval["loss"])
  from bert_jax.data import sources
  stats = sources.load_documents(c.data, "train")
  assert stats.skipped_non_utf8 == 3


def run_cli(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "launch.pretrain", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_two_steps_end_to_end(tmp_path, bundled_tokenizer):
  wd = tmp_path / "run"
  overrides = ["--config.model.vocab_size=512", "--config.model.hidden_size=32",
               "--config.model.num_heads=4", "--config.model.intermediate_size=64",
               f"--config.data.tokenizer={bundled_tokenizer}", "--config.data.seq_len=64",
               "--config.train.batch_size=8", "--config.train.steps=2",
               "--config.train.eval_batches=1", "--config.mlm.max_predictions=10"]
  r = run_cli(f"--workdir={wd}", "--config=configs/pretrain.py:bert,tiny", *overrides)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "eval mlm/accuracy" in r.stdout
  config = json.loads((wd / "config.json").read_text())
  assert config["train"]["steps"] == 2 and config["model"]["hidden_size"] == 32
  assert (wd / "checkpoints" / "2").is_dir() and (wd / "loss.png").exists()
  assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
  rows = metrics_lib.read_metrics(wd)
  assert {r["split"] for r in rows} == {"train", "eval"}
  bad = run_cli(f"--workdir={wd}", "--config=configs/pretrain.py:bert,tiny",
                "--config.train.stepz=3")
  assert bad.returncode != 0
  assert "unknown config field 'train.stepz'" in bad.stderr
  assert "train.steps" in bad.stderr
  # Without --config the default preset is loaded while the flag is defined: still checked,
  # and a misspelt section lists the top-level fields.
  bad = run_cli(f"--workdir={wd}", "--config.trian.steps=3")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert "unknown config field 'trian.steps'" in bad.stderr
  assert "Did you mean train.steps" in bad.stderr
  listed = bad.stderr.split("Valid fields: ", 1)[1].split()[0:100]
  assert {"data,", "train,", "model,"} <= set(listed), bad.stderr
  bad = run_cli(f"--workdir={wd}", "--config.train.steps=abc")  # a value of the wrong type
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  assert "--config.train.steps=abc: invalid literal for int()" in bad.stderr


def test_a_step_that_cannot_fit_is_refused_before_allocation(tmp_path, bundled_tokenizer):
  # Wide enough that parameters + gradients + Adam moments (~16 bytes x 24 H^2) exceed
  # what one (simulated) device may use here, whatever the host's RAM.
  from bert_jax import memory
  limit, _ = memory.device_limit(jax.local_devices()[0])
  hidden = int(np.ceil(np.sqrt(2 * limit / (16 * 24)) / 128)) * 128
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), model__hidden_size=hidden,
                  model__intermediate_size=4 * hidden)
  with pytest.raises(MemoryError, match=r"needs .* GiB per device .* train.batch_size"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not list((tmp_path / "w" / "checkpoints").glob("*"))


def test_static_pairs_note_names_the_passes_and_a_dupe_factor():
  assert train.static_pairs_note("single", 100, 10_000, 1) is None  # MLM re-masks anyway
  assert train.static_pairs_note("sop", 1000, 4000, 1) is None  # 4 passes: fine
  note = train.static_pairs_note("sop", 17_000, 8000 * 32, 1)
  assert "15.1 times" in note and "--config.data.dupe_factor=4" in note
  # Already duplicated, still too many passes: the suggestion grows from the current value.
  assert "--config.data.dupe_factor=8" in train.static_pairs_note("nsp", 1000, 16_000, 2)


def test_pair_run_over_few_pairs_warns_at_start(tmp_path, bundled_tokenizer, caplog):
  """A real NSP run whose 6 steps x 8 read a 5-document corpus's few pairs many times."""
  docs = [[f"Sentence {i} of document {d} says something about item {i + d}."
           for i in range(4)] for d in range(5)]
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join("\n".join(d) for d in docs))
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), data__source="text",
                  data__train_files=str(corpus), data__eval_files=str(corpus),
                  objectives="mlm:1.0,nsp:1.0", train__steps=6, train__eval_batches=1,
                  train__batch_size=8, train__eval_every=6, train__checkpoint_every=6)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  notes = [r.getMessage() for r in caplog.records if "dupe_factor" in r.getMessage()]
  assert len(notes) == 1 and notes[0].startswith("NSP pairs are drawn once")


def test_evaluate_checkpoint_repeats_the_runs_evaluation(reference_run, tmp_path):
  """launch.evaluate: with the run's settings, the run's own held-out scores at that step;
  more batches and draws change them; a fine-tuning workdir is sent to predict."""
  _, workdir = reference_run
  rows = [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "eval"]
  last = max(rows, key=lambda r: r["step"])
  step, scores, held_out = train.evaluate_checkpoint(workdir)
  assert held_out[0].startswith("[eval]")
  assert step == last["step"] == 6
  for k, v in scores.items():
    np.testing.assert_allclose(v, last[k], rtol=1e-5, err_msg=k)
  _, more, _ = train.evaluate_checkpoint(workdir, step=4, eval_batches=4, dupe_factor=2)
  assert set(more) == set(scores) and more["mlm/loss"] != scores["mlm/loss"]
  (tmp_path / "ft").mkdir()
  (tmp_path / "ft" / "encoder_config.json").write_text("{}")
  with pytest.raises(ValueError, match="fine-tuning workdir"):
    train.evaluate_checkpoint(str(tmp_path / "ft"))
  out = subprocess.run([sys.executable, "-m", "launch.evaluate", "--workdir", workdir],
                       cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  printed = dict(line.split() for line in out.stdout.splitlines()[1 + len(held_out):])
  assert float(printed["mlm/accuracy"]) == pytest.approx(scores["mlm/accuracy"], abs=1e-4)
