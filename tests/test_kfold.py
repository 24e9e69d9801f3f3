"""K-fold cross-validation, ensembles and pseudo-labels (bert_jax/finetune/kfold.py,
ensemble.py, pseudo.py) on tiny real runs: folds partition the training set (stratified),
the CV score is the metric of the out-of-fold predictions, finished folds are not rerun;
the ensemble is the mean of its members' own predictions; pseudo-labelling keeps exactly
the confident rows and trains on train + kept; the CLI's one-line refusal."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bert_jax import run_config
from bert_jax.data import bundled
from bert_jax.finetune import ensemble, kfold, loop, predict, pseudo, readers
from tests.conftest import REPO
from tests.test_faults import assert_one_message
from tests.test_finetune_run import ft_config, pretrained  # noqa: F401  (a fixture)

ENV = dict(os.environ, PYTHONPATH=str(REPO))  # with conftest's JAX cache
K = 2


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def tiny(init):
  c = ft_config(init, steps=1, batch_size=8)  # 32 train / 16 dev records of the bundled task
  c.optim.lr = 1e-3
  return c


@pytest.fixture(scope="module")
def cv(pretrained, tmp_path_factory):  # noqa: F811
  out = str(tmp_path_factory.mktemp("cv"))
  c = tiny(pretrained)
  return c, out, kfold.run_kfold(c, K, out, log=lambda s: None)


@pytest.fixture(scope="module")
def teacher(pretrained, tmp_path_factory):  # noqa: F811
  """A run on the bundled source itself (pseudo-labelling writes its records out)."""
  out = str(tmp_path_factory.mktemp("teacher"))
  loop.finetune(tiny(pretrained), out, quiet=True)
  return out


def test_folds_are_deterministic_partitions():
  labels = [0] * 10 + [1] * 6 + [2] * 4
  a = kfold.fold_assignment(labels, 3, 0, True)
  assert sorted(set(a)) == [0, 1, 2] and np.array_equal(a, kfold.fold_assignment(labels, 3, 0,
                                                                               True))
  assert not np.array_equal(a, kfold.fold_assignment(labels, 3, 1, True))
  for c in (0, 1, 2):  # every class spread over the folds as evenly as it can be
    counts = np.bincount(a[np.asarray(labels) == c], minlength=3)
    assert counts.max() - counts.min() <= 1
  r = kfold.fold_assignment(np.linspace(0, 1, 11).tolist(), 4, 0, False)  # regression
  assert sorted(np.bincount(r).tolist()) == [2, 3, 3, 3]
  with pytest.raises(ValueError, match="k=1 folds must be in 2..20"):
    kfold.fold_assignment(labels, 1, 0, True)
  with pytest.raises(ValueError, match="no class has 11 training records"):
    kfold.fold_assignment(labels, 11, 0, True)
  tagging = tiny("")
  tagging.task.kind = "tagging"
  with pytest.raises(ValueError, match="classification and regression.*'tagging'"):
    kfold.run_kfold(tagging, 2, "/nonexistent")


def test_kfold_partitions_scores_and_resumes(cv):
  c, out, result = cv
  records = readers.read_split(c.task, "train").records
  assert len(records) == 32
  with open(os.path.join(out, kfold.FOLDS_FILE)) as f:
    fold = np.asarray(json.load(f)["fold"])
  labels = np.asarray([r["label"] for r in records])
  for cls in np.unique(labels):  # stratified: each class split as evenly as it can be
    counts = np.bincount(fold[labels == cls], minlength=K)
    assert counts.max() - counts.min() <= 1, (cls, counts)

  oof = read_jsonl(os.path.join(out, kfold.OOF_FILE))
  assert [r["index"] for r in oof] == list(range(32))  # every record once, out of fold
  assert [r["fold"] for r in oof] == fold.tolist()
  assert [r["label"] for r in oof] == labels.tolist()
  for k in range(K):
    held = np.flatnonzero(fold == k)
    dev = read_jsonl(os.path.join(out, "data", f"fold{k}.dev.jsonl"))
    train = read_jsonl(os.path.join(out, "data", f"fold{k}.train.jsonl"))
    assert [r["text"] for r in dev] == [records[j]["text"] for j in held]
    assert len(train) + len(dev) == 32
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    f = result.folds[k]
    assert (f["n_train"], f["n_dev"]) == (len(train), len(held))
    mine = [r for r in oof if r["fold"] == k]  # the fold's score is its held-out accuracy
    assert f["score"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in mine]))
    fold_config = run_config.load(f["workdir"])
    assert fold_config.task.source == "files"  # every fold has the full label set
    assert fold_config.task.label_names == ",".join(bundled.task_label_names())

  preds = np.asarray([r["prediction"] for r in oof])
  probs = np.asarray([r["probabilities"] for r in oof])
  assert probs.shape == (32, 6) and np.array_equal(preds, probs.argmax(-1))
  with open(os.path.join(out, kfold.CV_FILE)) as f:
    saved = json.load(f)
  assert saved["cv"]["accuracy"] == pytest.approx(float(np.mean(preds == labels)))
  assert result.cv == saved["cv"]
  scores = [f["score"] for f in result.folds]
  assert saved["mean"] == pytest.approx(np.mean(scores))
  assert saved["sd"] == pytest.approx(np.std(scores, ddof=1))

  os.remove(os.path.join(out, "fold1", loop.RESULTS_FILE))  # fold 1 as if cut at its end
  started = []
  again = kfold.run_kfold(c, K, out, log=started.append)
  assert len(started) == 2 and started[0].startswith(f"== fold 2/{K}")  # fold 0 skipped
  assert again.cv == result.cv and [f["score"] for f in again.folds] == scores
  started.clear()
  kfold.run_kfold(c, K, out, log=started.append)
  assert not started  # all done: nothing runs
  with pytest.raises(ValueError, match="made with k=2, seed=0"):
    kfold.run_kfold(c, 3, out, log=lambda s: None)


def test_ensemble_is_the_mean_of_its_members(cv, teacher, tmp_path):
  c, out, result = cv
  members = [f["workdir"] for f in result.folds] + [teacher]
  names = bundled.task_label_names()
  dev_file = os.path.join(out, "data", "fold0.dev.jsonl")  # fold 0's dev split: the default
  gold = np.asarray([r["label"] for r in read_jsonl(dev_file)])
  own = []  # each member's probabilities, through predict on its own
  for i, wd in enumerate(members):
    rows = predict.predict_file(wd, dev_file, str(tmp_path / f"m{i}.jsonl")).rows
    own.append([[r["probabilities"][n] for n in names] for r in rows])
  mean = np.mean(np.asarray(own), axis=0)

  r = ensemble.ensemble(members, out=str(tmp_path / "ens"))
  assert r.n == 16 and r.input == f"dev split of {members[0]}"
  np.testing.assert_allclose([row["probabilities"] for row in r.rows], mean, atol=1e-12)
  assert r.scores["accuracy"] == pytest.approx(float(np.mean(mean.argmax(-1) == gold)))
  assert [row["label"] for row in r.rows] == gold.tolist()
  for m, probs in zip(r.members, own):
    assert m["accuracy"] == pytest.approx(float(np.mean(np.argmax(probs, -1) == gold)))
  with open(os.path.join(members[0], loop.RESULTS_FILE)) as f:  # as its own dev evaluation
    assert r.members[0]["accuracy"] == pytest.approx(json.load(f)["best"]["accuracy"])
  assert read_jsonl(str(tmp_path / "ens" / ensemble.PREDICTIONS_FILE)) == r.rows
  given = ensemble.ensemble(members[:2], dev_file)  # the same rows from a labelled file
  two = np.mean(np.asarray(own[:2]), axis=0)
  np.testing.assert_allclose([row["probabilities"] for row in given.rows], two, atol=1e-12)
  assert given.members == r.members[:2]

  other = str(tmp_path / "other_labels")
  shutil.copytree(members[1], other)
  with open(os.path.join(other, "labels.json"), "w") as f:
    json.dump(names[::-1], f)
  with pytest.raises(ValueError, match="different tasks.*labels="):
    ensemble.ensemble([members[0], other])
  with pytest.raises(ValueError, match="at least two workdirs"):
    ensemble.ensemble(members[:1])


def test_pseudo_labels_keep_the_confident_rows(teacher, tmp_path):
  rows = list(readers.read_rows(str(bundled.task_path("dev"))))[100:132]
  unlabelled = tmp_path / "unlabelled.jsonl"
  unlabelled.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
  own = predict.predict_file(teacher, str(unlabelled), str(tmp_path / "own.jsonl")).rows
  confidence = np.asarray([max(r["probabilities"].values()) for r in own])
  levels = np.unique(confidence)  # a 1-step model is nearly uniform: few distinct levels
  assert len(levels) > 1
  threshold = float(levels[len(levels) // 2])
  expected = [r for r, p in zip(own, confidence) if p >= threshold]
  assert 0 < len(expected) < len(own)

  out = str(tmp_path / "pseudo")
  with pytest.raises(ValueError, match=r"threshold=1.5 must be in \(0, 1\]"):
    pseudo.pseudo_label(teacher, str(unlabelled), out, 1.5)
  r = pseudo.pseudo_label(teacher, str(unlabelled), out, threshold, log=lambda s: None)
  assert (r.rows, r.kept, r.n_train, r.n_train_new) == (32, len(expected), 32,
                                                       32 + len(expected))
  names = bundled.task_label_names()
  kept = read_jsonl(os.path.join(out, "data", "pseudo_labels.jsonl"))
  assert [k["text"] for k in kept] == [e["text"] for e in expected]
  assert [k["label"] for k in kept] == [names.index(e["label"]) for e in expected]
  new = run_config.load(r.workdir)  # what the new run trained on: train + kept
  assert len(readers.read_split(new.task, "train").records) == 32 + len(expected)
  assert len(readers.read_split(new.task, "dev").records) == 16  # the teacher's dev set
  with open(os.path.join(teacher, loop.RESULTS_FILE)) as f:
    assert r.original == json.load(f)["best"]["accuracy"]
  with open(os.path.join(r.workdir, loop.RESULTS_FILE)) as f:
    assert r.new == json.load(f)["best"]["accuracy"]
  with open(os.path.join(out, pseudo.RESULTS_FILE)) as f:
    assert json.load(f)["kept"] == len(expected)
  with pytest.raises(ValueError, match="use another --out"):
    pseudo.pseudo_label(teacher, str(unlabelled), out, 0.99)


def test_cli_refuses_members_of_different_tasks(cv, tmp_path):
  first = cv[2].folds[0]["workdir"]
  other = str(tmp_path / "other_task")
  shutil.copytree(first, other)
  c = run_config.load(other)
  c.task.name = "sst2"
  run_config.save(c, other)
  r = subprocess.run([sys.executable, "-m", "launch.finetune_kit", "--mode", "ensemble",
                      f"--workdirs={first},{other}", f"--out={tmp_path / 'ens'}"],
                     cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
  assert_one_message(r, 2, "different tasks", "task.name='sst2'", "task.name='bundled'")
