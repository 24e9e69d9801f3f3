"""launch.predict: a fine-tuned workdir predicts on new rows what its own dev evaluation
predicted on them (classification through the CLI, tagging through the library);
fill-mask with a pretraining workdir's MLM head; a bad row or workdir is one `error:`
line naming it, exit status 2."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bert_jax.finetune import loop, predict
from tests.conftest import REPO
from tests.test_faults import assert_one_message
from tests.test_finetune_run import ft_config, pretrained  # noqa: F401  (fixture)

ENV = dict(os.environ, PYTHONPATH=str(REPO))  # with conftest's JAX cache


def cli_command(*args):
  return [sys.executable, "-m", "launch.predict", *args]


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def classifier(pretrained, tmp_path_factory):  # noqa: F811
  """The bundled 6-class task, 2 steps, dev batches of dynamic length."""
  out = str(tmp_path_factory.mktemp("ft_cls"))
  c = ft_config(pretrained, steps=2)
  c.optim.lr = 1e-3
  c.data.update(dict(dynamic_padding=True, pad_multiple=16))
  loop.finetune(c, out, quiet=True)
  return out


@pytest.fixture(scope="module")
def tagger(pretrained, tmp_path_factory):  # noqa: F811
  """BIO tagging on 12 sentences (train = dev), 1 step."""
  root = tmp_path_factory.mktemp("ft_tag")
  rng = np.random.default_rng(0)
  words = "And Moses went up unto the mount of God in the land of Egypt".split()
  rows = [{"tokens": list(t), "tags": ["B-PER" if w == "Moses" else
                                       "B-LOC" if w == "Egypt" else "O" for w in t]}
          for t in (rng.choice(words, int(rng.integers(4, 14))) for _ in range(12))]
  data = root / "data.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = ft_config(pretrained)
  c.task.update(dict(source="files", train_files=str(data), dev_files=str(data),
                     kind="tagging", metrics="entity_f1,token_accuracy",
                     main_metric="entity_f1"))
  c.data.update(dict(seq_len=32, dynamic_padding=True, pad_multiple=16))
  c.train.update(dict(batch_size=8, eval_batch_size=16))
  out = str(root / "ft")
  loop.finetune(c, out, quiet=True)
  return out, str(data)


def test_classification_cli_equals_dev_predictions(classifier, tmp_path):
  dev = read_jsonl(os.path.join(classifier, loop.PREDICTIONS_FILE))
  with open(os.path.join(classifier, "labels.json")) as f:
    names = json.load(f)
  # The dev rows as a CSV of new data (an extra column is ignored).
  rows = tmp_path / "dev.csv"
  with open(rows, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "text"])
    w.writerows([i, r["text"]] for i, r in enumerate(dev))
  out = tmp_path / "pred.jsonl"
  r = subprocess.run(cli_command(f"--workdir={classifier}", f"--input={rows}", f"--out={out}",
                                 "--batch_size=16"),
                     cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "(best checkpoint, step 2)" in r.stdout and "16 rows" in r.stdout
  got = read_jsonl(out)
  assert [g["line"] for g in got] == list(range(2, 18))  # line 1: the header
  for g, d in zip(got, dev):
    assert g["text"] == d["text"]
    assert g["label"] == d["predicted_name"] == names[d["prediction"]]
    assert list(g["probabilities"]) == names
    np.testing.assert_allclose(list(g["probabilities"].values()), d["probabilities"],
                               atol=1e-5)

  # The same rows as plain text, other batches (5, in length order): the same predictions.
  txt = tmp_path / "dev.txt"
  txt.write_text("".join(d["text"] + "\n" for d in dev))
  again = predict.predict_file(classifier, str(txt), str(tmp_path / "p.jsonl"), batch_size=5)
  assert again.kind == "classification" and again.step == 2
  assert [g["line"] for g in again.rows] == list(range(1, 17))
  assert [g["label"] for g in again.rows] == [g["label"] for g in got]
  for a, g in zip(again.rows, got):
    np.testing.assert_allclose(list(a["probabilities"].values()),
                               list(g["probabilities"].values()), atol=1e-4)


def test_tagging_through_the_library(tagger, tmp_path):
  workdir, data = tagger
  dev = read_jsonl(os.path.join(workdir, loop.PREDICTIONS_FILE))
  from bert_jax.compress import workdir as finetuned
  ft = finetuned.load_finetuned(workdir, "best")
  examples = predict.read_examples(data, "tagging", ft.config.task)
  rows = predict.predict_task(ft, examples, batch_size=16)
  assert [r["line"] for r in rows] == list(range(1, 13))
  for r, d in zip(rows, dev):
    assert r["tokens"] == d["tokens"] and r["tags"] == d["predicted_tags"]
    assert len(r["tags"]) == len(r["tokens"])
  # plain text: whitespace-split words, other batches; the latest checkpoint is the best
  txt = tmp_path / "words.txt"
  txt.write_text("".join(" ".join(d["tokens"]) + "\n" for d in dev))
  res = predict.predict_file(workdir, str(txt), str(tmp_path / "t.jsonl"), which="latest",
                             batch_size=3)
  assert [r["tags"] for r in res.rows] == [d["predicted_tags"] for d in dev]
  assert read_jsonl(tmp_path / "t.jsonl") == res.rows


def test_fill_mask_top_k_and_the_models_argmax(pretrained, tmp_path):  # noqa: F811
  import jax
  from bert_jax import checkpoint, hf

  lines = ["And Moses went up unto the [MASK] of God .",
           "In the [MASK] God created the heaven and the [MASK] .",
           "[MASK]"]
  txt = tmp_path / "masked.txt"
  txt.write_text("".join(line + "\n" for line in lines))
  res = predict.predict_file(pretrained, str(txt), str(tmp_path / "fill.jsonl"), top_k=5)
  assert res.mode == predict.FILL_MASK and res.step == 2
  assert [len(r["masks"]) for r in res.rows] == [1, 2, 1]

  # Independently: transformers' layout of the same weights (the encoder and its MLM head
  # at every position, bert_jax.hf), on the same ids.
  m = predict.fill_mask_model(pretrained)
  params, _ = checkpoint.restore_params(pretrained, which="best")
  model = hf.PretrainingModel(m.cfg, (("mlm", "mlm"),))
  vocab = m.tokenizer.vocab_size
  for row, feat in zip(res.rows, predict.mask_features(m, predict.read_examples(str(txt),
                                                                                  None))):
    ids = feat["input_ids"][None]
    logits = np.asarray(jax.jit(model.apply)(
        {"params": {"encoder": params["encoder"], "mlm": params["mlm"]}}, ids,
        np.zeros_like(ids), np.ones_like(ids))["mlm"][0, :, :vocab], np.float64)
    for mask in row["masks"]:
      preds = mask["predictions"]
      assert ids[0, mask["position"]] == m.tokenizer.mask_id
      assert len(preds) == 5
      probs = [p["probability"] for p in preds]
      assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
      z = logits[mask["position"]]
      assert preds[0]["id"] == int(z.argmax())
      expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      np.testing.assert_allclose(probs, np.sort(expected)[::-1][:5], atol=1e-5)
      assert preds[0]["piece"] == m.tokenizer.pieces()[preds[0]["id"]]


def test_bad_rows_and_workdirs_are_one_message(classifier, pretrained, tmp_path):  # noqa: F811
  files = {
      "json.jsonl": '{"text": "a"}\n{"text": "b"\n',
      "field.jsonl": '{"text": "a"}\n{"text": "b"}\n{"sentence": "c"}\n',
      "empty.jsonl": '{"text": "a"}\n{"text": "  "}\n',
      "blank.txt": "a\nb\n\nc\n",
      "columns.csv": "text,id\na,1\nb,2,3\n",
      "masks.txt": "the [MASK] of God\nno mask here\n",
  }
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  nowhere = str(tmp_path / "nowhere")
  cases = [  # (workdir, input, what the error line names)
      (classifier, "json.jsonl", [":2: not a JSON object"]),
      (classifier, "field.jsonl", [":3: no field 'text'", "task.text_key"]),
      (classifier, "empty.jsonl", [":2: empty text in field 'text'"]),
      (classifier, "blank.txt", [":3: empty line"]),
      (classifier, "columns.csv", [":3: 3 columns where the header", "has 2"]),
      (pretrained, "masks.txt", [":2: no [MASK] in the line"]),
  ]
  commands = [cli_command(f"--workdir={wd}", f"--input={tmp_path / name}",
                          f"--out={tmp_path / 'out.jsonl'}") for wd, name, _ in cases]
  commands.append(cli_command(f"--workdir={nowhere}", f"--input={tmp_path / 'blank.txt'}",
                              f"--out={tmp_path / 'out.jsonl'}"))
  # Concurrently: each fails before any checkpoint is read (seconds, mostly imports).
  procs = [subprocess.Popen(c, cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  results = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=600)
    results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  for r, (_, name, needles) in zip(results, cases):
    line = assert_one_message(r, 2, str(tmp_path / name), *needles)
    assert line.startswith(f"error: {tmp_path / name}:"), line
  assert_one_message(results[-1], 2, nowhere, "not a bert-jax workdir")
  assert not (tmp_path / "out.jsonl").exists()
