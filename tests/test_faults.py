"""Issue #17, seen from outside: unreadable checkpoints, retention across relaunches, a
rejected config, a busy workdir, the skip-policy limit, a swapped tokenizer, silent data
drops, user mistakes on the command line, SIGTERM's exit code, a re-shaped schedule and the
exported tokenizer on special tokens."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import metrics as metrics_lib
from bert_jax import nonfinite, train, workdir_lock
from tests.conftest import REPO, tiny_config, times_logged, train_losses
from tests.test_reliability import ENV, poison, pretrain_command

TINY = ["--config.objectives=mlm:1.0", "--config.model.vocab_size=512",
        "--config.model.hidden_size=32", "--config.model.num_heads=4",
        "--config.model.intermediate_size=64", "--config.model.max_position_embeddings=64",
        "--config.data.seq_len=64", "--config.train.batch_size=16",
        "--config.train.steps=2", "--config.train.eval_batches=1",
        "--config.mlm.max_predictions=10"]


def cli(module, *args, timeout=900):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def assert_one_message(r, code, *needles):
  """Exit `code`, no traceback, one `error:` line holding each needle."""
  assert r.returncode == code, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def damage(path):
  """Truncates the data files of each checkpoint's ocdbt data directory (the issue's
  largest file alone is not always one the restore reads)."""
  for step_dir in sorted(path.glob("checkpoints/*/state/ocdbt.process_0/d")):
    for f in step_dir.iterdir():
      with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)


# ----------------------------------------------------------------- 1. unreadable checkpoints


def test_every_checkpoint_unreadable_stops_with_their_steps(tmp_path, reference_run):
  config, reference = reference_run
  wd = tmp_path / "run"
  train.train_and_evaluate(config, str(wd), stop_after=4)
  damage(wd)
  r = subprocess.run(pretrain_command(config, wd), cwd=REPO, env=ENV, capture_output=True,
                     text=True, timeout=900)
  assert_one_message(r, 1, "steps [2, 4] are unreadable", str(wd / "checkpoints"),
                     "restart_if_unreadable=True")
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]  # left in place
  assert times_logged(wd) == {1: 1, 2: 1, 3: 1, 4: 1}  # nothing was redone
  # Asked explicitly: moved aside, started over, and step 1 is the fresh run's step 1 (the
  # data iterator was not moved by the failed restores).
  config = config.copy_and_resolve_references()
  config.train.restart_if_unreadable = True
  train.train_and_evaluate(config, str(wd))
  assert len(list((wd / "checkpoints_unreadable").iterdir())) == 2
  assert times_logged(wd)[1] == 2
  a, b = train_losses(reference), train_losses(wd)
  assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]


# ----------------------------------------------------------------- 2. keep and keep-best


def test_keep_holds_across_relaunches_and_best_is_the_lowest_eval_loss(
    tmp_path, bundled_tokenizer):
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), train__steps=7,
                  train__keep=2, train__checkpoint_every=1, train__eval_every=2)
  wd = tmp_path / "w"
  for stop in (3, 5, None):
    train.train_and_evaluate(c, str(wd), stop_after=stop)
    steps = sorted(int(p) for p in os.listdir(wd / "checkpoints") if p.isdigit())
    assert len(steps) <= 3, steps  # the last 2 plus the best
  evals = {r["step"]: r["loss"] for r in metrics_lib.latest_rows(metrics_lib.read_metrics(wd))
           if r["split"] == "eval" and r["step"] > 0}
  best = min(evals, key=evals.get)
  assert steps[-2:] == [6, 7] and best in steps
  _, step = checkpoint_lib.restore_params(str(wd), which="best")
  assert step == best
  # Without eval losses recorded, best is refused rather than silently the latest.
  c.train.keep_best = False
  other = tmp_path / "nobest"
  train.train_and_evaluate(c, str(other), stop_after=1)
  with pytest.raises(ValueError, match="no checkpoint .* has an eval loss recorded"):
    checkpoint_lib.restore_params(str(other), which="best")


def test_retention_and_best_across_checkpointer_relaunches(tmp_path):
  state = {"params": {"w": np.zeros((3,), np.float32)}}
  losses = {2: 1.0, 4: 0.5, 6: 0.9, 8: 0.8}  # the best (4) is neither first nor last

  def launch(steps):  # a relaunch: a new manager reading what the last one wrote
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=False)
    for s in steps:
      ckpt.save(s, state, None, metrics={"eval/loss": losses[s]} if s in losses else None)
    ckpt.close()
    return sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())

  assert launch([1, 2, 3, 4]) == [3, 4]
  assert launch([5, 6]) == [4, 5, 6]
  assert launch([7, 8, 9]) == [4, 8, 9]
  _, step = checkpoint_lib.restore_params(str(tmp_path), which="best")
  assert step == 4


# ----------------------------------------------------------------- 3 and 8. CLI mistakes


def test_a_rejected_config_leaves_the_workdir_usable(tmp_path, bundled_tokenizer):
  wd = tmp_path / "run"
  base = [f"--workdir={wd}", f"--config.data.tokenizer={bundled_tokenizer}", *TINY]
  r = cli("launch.pretrain", *base, "--config.model.vocab_size=1000")
  assert_one_message(r, 2, "does not match the tokenizer", "--config.model.vocab_size=512")
  assert not (wd / "config.json").exists()
  r = cli("launch.pretrain", *base)  # the fix the message names
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((wd / "config.json").read_text())["model"]["vocab_size"] == 512


@pytest.mark.parametrize("args,needle", [
    (["--config.data.seq_len=128"], "exceeds model.max_position_embeddings=64"),
    (["--config.train.steps=-3"], "train.steps must be >= 0"),
    (["--config.train.batch_size=12"], "must be divisible by the 8 devices"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.objectives=mlm:-1.0"], "must be positive"),
    (["--config=configs/pretrain.py:bort,tiny"], "unknown preset family 'bort'"),
    (["--config.train.steps=abc"], "invalid literal for int()"),
])
def test_user_mistakes_are_one_message_and_exit_2(tmp_path, bundled_tokenizer, args, needle):
  r = cli("launch.pretrain", f"--workdir={tmp_path / 'w'}",
          f"--config.data.tokenizer={bundled_tokenizer}", *TINY, *args)
  assert_one_message(r, 2, needle)
  assert not (tmp_path / "w" / "config.json").exists()


def test_verbose_shows_the_traceback(tmp_path, bundled_tokenizer):
  r = cli("launch.pretrain", f"--workdir={tmp_path / 'w'}", "--verbose",
          f"--config.data.tokenizer={bundled_tokenizer}", *TINY, "--config.train.steps=-3")
  assert r.returncode != 0 and "Traceback" in r.stderr and "train.steps must be" in r.stderr


def test_an_unknown_fine_tuning_metric_is_refused_before_training(tmp_path):
  wd = tmp_path / "ft"
  r = cli("launch.finetune", f"--workdir={wd}", "--config.task.metrics=accuracy,acuracy")
  assert_one_message(r, 2, "'acuracy' not a classification metric", "macro_f1")
  assert not (wd / "checkpoints").exists() and not (wd / "metrics.jsonl").exists()
  r = cli("launch.finetune", f"--workdir={wd}", "--config.task.main_metric=f1")
  assert_one_message(r, 2, "task.main_metric='f1' is not among the dev scores")


# ----------------------------------------------------------------- 4. workdir lock


def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_holder(
    tmp_path, bundled_tokenizer):
  wd = tmp_path / "run"
  with workdir_lock.hold(str(wd)):  # this process plays the first run
    r = cli("launch.pretrain", f"--workdir={wd}",
            f"--config.data.tokenizer={bundled_tokenizer}", *TINY)
    assert_one_message(r, 2, f"in use by another run (pid {os.getpid()}", "lock file")
  assert not (wd / "metrics.jsonl").exists() and not (wd / "config.json").exists()


# ----------------------------------------------------------------- 5. nan_policy=skip


def tensorboard_scalars(workdir):
  """{tag: {step: value}} from the event files (TFRecord framing, tensorboardX's proto)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in (workdir / "tensorboard").glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_skip_policy_stops_past_its_limit_and_shows_nan(monkeypatch, tmp_path,
                                                        bundled_tokenizer):
  # Steps 2, 3 and 5 (state.step 1, 2 and 4) are non-finite; two allowed, not three.
  def bad(b):  # eval batches have no step: never poisoned
    b = b.get("clean", b)  # the corrupted batch's clean part holds the step
    return "step" in b and ((b["step"][0] == 1) | (b["step"][0] == 2) | (b["step"][0] == 4))

  poison(monkeypatch, when=bad)
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), train__steps=6,
                  train__nan_policy="skip", train__max_nonfinite_steps=2,
                  train__log_every=2, train__checkpoint_every=2)
  wd = tmp_path / "w"
  train.train_and_evaluate(c, str(wd), stop_after=4)  # 2 skipped: within the limit
  with pytest.raises(nonfinite.TooManyNonFiniteSteps,
                     match=r"3 steps had a non-finite .* by step 6 .*max_nonfinite_steps=2"):
    train.train_and_evaluate(c, str(wd))  # counts the earlier launch's 2
  rows = {r["step"]: r for r in metrics_lib.read_metrics(wd) if r["split"] == "train"}
  assert [rows[s]["nonfinite_steps"] for s in (2, 4, 6)] == [1.0, 1.0, 1.0]  # counts
  assert all(np.isnan(rows[s]["loss"]) for s in (2, 4, 6))
  tb = tensorboard_scalars(wd)
  assert np.isnan(tb["train/loss"][2]) and tb["train/nonfinite_steps"][4] == 1.0
  assert [s for s, split in metrics_lib.nonfinite_points(metrics_lib.latest_rows(
      metrics_lib.read_metrics(wd)))] == [2, 4, 6]
  assert metrics_lib.plot_losses(str(wd))


# ----------------------------------------------------------------- 6. tokenizer of the run


def test_a_swapped_tokenizer_is_refused_naming_both_fingerprints(tmp_path, bundled_tokenizer):
  from bert_jax.data import bundled, tokenizer as tokenizer_lib
  wd = tmp_path / "run"
  wd.mkdir()
  shutil.copyfile(bundled_tokenizer, wd / "tokenizer.model")  # the run's own tokenizer
  c = tiny_config("", str(tmp_path / "cache"), train__steps=2)
  train.train_and_evaluate(c, str(wd))
  first = tokenizer_lib.load_tokenizer(wd).fingerprint
  docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
  other = tokenizer_lib.train_tokenizer([s for d in docs for s in d], tmp_path / "other",
                                        vocab_size=512, max_sentences=2000)
  shutil.copyfile(other, wd / "tokenizer.model")  # same vocabulary size, other ids
  second = tokenizer_lib.load_tokenizer(wd).fingerprint
  assert first != second
  r = subprocess.run(pretrain_command(c, wd, **{"train.steps": 2}), cwd=REPO, env=ENV,
                     capture_output=True, text=True, timeout=900)
  assert_one_message(r, 2, first, second, "tokenizer differs")


# ----------------------------------------------------------------- 7. silent data drops


def test_non_utf8_lines_are_counted_on_the_console(tmp_path, caplog):
  from bert_jax.data import sources
  from configs.pretrain import get_config
  lines = [f"Line {i} of the caf\u00e9 corpus." for i in range(400)]
  raw = b"\n".join(s.encode("utf-8") if i % 2 else s.encode("latin-1")
                   for i, s in enumerate(lines)) + b"\n"
  path = tmp_path / "mixed.txt"
  path.write_bytes(raw)
  c = get_config("bert,tiny")
  c.data.update(dict(source="text", train_files=str(path), text_format="lines"))
  with caplog.at_level("WARNING"):
    docs = sources.load_documents(c.data, "train")
  assert docs.skipped_non_utf8 == 200
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any("200 of 400 lines (50.0%) are not valid UTF-8" in m and str(path) in m
             for m in warned), warned


def test_dev_labels_unseen_in_train_are_an_error_unless_dropped(tmp_path, capsys):
  from bert_jax.finetune import readers
  from configs.finetune import get_config
  train_rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(40)]
  dev_rows = [{"text": f"d{i}", "label": "abcd"[i % 4]} for i in range(40)]
  for name, rows in (("train", train_rows), ("dev", dev_rows)):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = get_config("files")
  c.task.update(dict(train_files=str(tmp_path / "train.jsonl"),
                     dev_files=str(tmp_path / "dev.jsonl")))
  names = readers.read_split(c.task, "train").label_names
  assert names == ["a", "b"]
  with pytest.raises(ValueError, match=r"20 of 40 records have a label outside the label "
                                       r"set \['a', 'b'\].*'c': 10, 'd': 10.*drop_unknown"):
    readers.read_split(c.task, "dev", names)
  c.task.drop_unknown_labels = True
  dev = readers.read_split(c.task, "dev", names)
  assert len(dev.records) == 20
  err = capsys.readouterr().err
  assert "warning:" in err and "20 of 40 records" in err and "other 20" in err


# ----------------------------------------------------------------- 9. smaller ones


def test_extending_steps_on_resume_is_refused_unless_allowed(tmp_path, bundled_tokenizer):
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"), train__steps=2)
  wd = tmp_path / "w"
  train.train_and_evaluate(c, str(wd))
  r = subprocess.run(pretrain_command(c, wd, **{"train.steps": 4}), cwd=REPO, env=ENV,
                     capture_output=True, text=True, timeout=900)
  assert_one_message(r, 2, "train.steps changes from 2 to 4 on resume",
                     "allow_schedule_change=True", "--config.train.steps=2")
  c.train.steps, c.train.allow_schedule_change = 4, True
  train.train_and_evaluate(c, str(wd))
  assert sorted(train_losses(wd)) == [1, 2, 3, 4] and times_logged(wd)[1] == 1


def test_exported_tokenizer_encodes_special_tokens_like_ours(tmp_path, bundled_tokenizer):
  import transformers

  from bert_jax import hf
  from bert_jax.data import bundled, tokenizer as tokenizer_lib
  ours = tokenizer_lib.load_tokenizer(bundled_tokenizer)
  hf.sentencepiece_to_hf(bundled_tokenizer, str(tmp_path / "hf"))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"),
                                                      local_files_only=True)
  docs, _ = bundled.read_documents(bundled.corpus_path("validation"))
  verses = [s for d in docs[:3] for s in d]
  texts = ["the [MASK] of God", "[MASK] and", "a[MASK]b", "x [CLS] y [SEP] z",
           "the  [MASK]  of", "[MASK]", "[PAD] [UNK]", "In the beginning [MASK] created"]
  texts += [v.replace(" the ", " [MASK] ", 1) for v in verses] + verses
  want = [theirs(t, add_special_tokens=False)["input_ids"] for t in texts]
  assert [ours.encode(t) for t in texts] == want
  assert ours.encode_batch(texts) == want
  for t in texts[:8]:
    ids, spans = ours.encode_with_offsets(t)
    assert ids == ours.encode(t)
    for i, (b, e) in zip(ids, spans):
      if i in (ours.mask_id, ours.cls_id, ours.sep_id):
        assert t[b:e] == ours.decode([i]).strip()
