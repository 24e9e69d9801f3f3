"""Fine-tuning data: readers (files, bundled, tfds mock), features, batching, decoding."""

import gzip
import json

import numpy as np
import pytest

from bert_jax.finetune import batching, features, predictions, readers
from configs.finetune import get_config


@pytest.fixture(scope="module")
def tok(bundled_tokenizer):
  from bert_jax.data.tokenizer import load_tokenizer
  return load_tokenizer(bundled_tokenizer)


def task_cfg(preset="files", **fields):
  c = get_config(preset)
  c.task.update(fields)
  return c.task


# ----------------------------------------------------------------------------- readers


def test_csv_and_jsonl_files(tmp_path):
  train = tmp_path / "train.csv"
  train.write_text("sentence,other,label\nGood news,Yes,pos\n\"A, b\",No,neg\nMeh,x,\n")
  dev = tmp_path / "dev.jsonl.gz"
  with gzip.open(dev, "wt") as f:
    f.write(json.dumps({"sentence": "Fine", "other": "ok", "label": "pos"}) + "\n")
    f.write(json.dumps({"sentence": "Odd", "other": "ok", "label": "unseen"}) + "\n")
  t = task_cfg(train_files=str(train), dev_files=str(dev), text_key="sentence",
               text_pair_key="other")
  tr = readers.read_split(t, "train")
  assert tr.label_names == ["neg", "pos"]  # sorted train labels
  assert tr.records == [{"text": "Good news", "text_pair": "Yes", "label": 1},
                        {"text": "A, b", "text_pair": "No", "label": 0}]
  assert tr.skipped == {"no usable label": 1}
  with pytest.raises(ValueError, match=r"1 of 2 records have a label outside"):
    readers.read_split(t, "dev", tr.label_names)  # unseen dev labels: an error by default
  t.drop_unknown_labels = True
  dv = readers.read_split(t, "dev", tr.label_names)
  assert [r["label"] for r in dv.records] == [1]
  assert dv.skipped == {"label not in the label set": 1}
  with pytest.raises(ValueError, match="no field 'txt'.*task"):
    readers.read_split(task_cfg(train_files=str(train), text_key="txt"), "train")
  with pytest.raises(ValueError, match="No file matches"):
    readers.read_split(task_cfg(train_files=str(tmp_path / "nope.csv")), "train")
  reg = tmp_path / "reg.tsv"
  reg.write_text("text\tlabel\na\t0.5\nb\t4\n")
  r = readers.read_split(task_cfg(kind="regression", train_files=str(reg)), "train")
  assert [x["label"] for x in r.records] == [0.5, 4.0]


def test_bundled_task():
  t = get_config("bundled").task
  tr = readers.read_split(t, "train")
  assert len(tr.records) == 6000 and len(tr.label_names) == 6
  dv = readers.read_split(t, "dev", tr.label_names)
  assert len(dv.records) == 598
  assert {r["label"] for r in dv.records} == set(range(6))


def test_tfds_tasks_under_mock_data():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, num_examples=4):
    sst2 = readers.read_split(get_config("sst2").task, "train")
    assert sst2.label_names == ["negative", "positive"] and len(sst2.records) == 4
    stsb = readers.read_split(get_config("stsb").task, "dev")
    assert all(isinstance(r["label"], float) and r["text_pair"] for r in stsb.records)
    mnli = readers.read_split(get_config("mnli").task, "dev")  # validation_matched
    assert len(mnli.label_names) == 3
    conll = readers.read_split(get_config("conll2003").task, "train")
    assert conll.label_names[:3] == ["O", "B-PER", "I-PER"]
    assert all(len(r["tokens"]) == len(r["tags"]) for r in conll.records)
    squad = readers.read_split(get_config("squad_v2").task, "dev")
    assert len(squad.records) == 4  # v2 keeps unanswerable questions (answers == [])
    impossible = sum(r["answers"] == [] for r in squad.records)
    if 0 < impossible < 4:
      strict = get_config("squad_v2").task
      strict.version_2 = False
      assert len(readers.read_split(strict, "dev").records) == 4 - impossible
    v1 = readers.read_split(get_config("squad_v1").task, "train")
    assert all(r["answers"] and r["id"] for r in v1.records)
    # mock HellaSwag has random ending counts and labels: reported, not misread
    with pytest.raises(ValueError, match="No usable multiple_choice.*skipped"):
      readers.read_split(get_config("hellaswag").task, "train")


def test_multiple_choice_files(tmp_path, tok):
  rows = [{"sent1": "Moses went up.", "sent2": "He", "ending0": "came down.",
           "ending1": "slept.", "ending2": "sang.", "ending3": "ate.", "label": 2}]
  f = tmp_path / "swag.jsonl"
  f.write_text("\n".join(json.dumps(r) for r in rows))
  t = task_cfg("swag", train_files=str(f))
  data = readers.read_split(t, "train")
  assert data.records[0]["choices"][0] == "He came down." and data.records[0]["label"] == 2
  feats = features.choice_features(data.records, tok, 16)
  x = feats.features[0]
  assert x["input_ids"].shape[0] == 4 and x["input_ids"].shape == x["attention_mask"].shape
  assert (x["input_ids"][:, 0] == tok.cls_id).all()


# ----------------------------------------------------------------------------- features


def test_pair_layout_and_truncation(tok):
  a, b = features.truncate_pair(list(range(10)), list(range(4)), 8)
  assert (len(a), len(b)) == (4, 4)
  recs = [{"text": "In the beginning " * 20, "text_pair": "God", "label": 1}]
  f = features.sequence_features(recs, tok, 16, "classification").features[0]
  assert len(f["input_ids"]) == 16 and f["input_ids"][0] == tok.cls_id
  assert f["input_ids"][-1] == tok.sep_id and f["segment_ids"][-2:].tolist() == [1, 1]


def test_offsets_and_qa_windows(tok):
  text = "  Naomi’s  café: Ruth said, whither thou goest."
  ids, spans = features.encode_with_offsets(tok, text)
  assert ids == tok.encode(text)
  pieces = [text[a:b] for a, b in spans]
  assert "".join(pieces).replace(" ", "") == text.replace(" ", "")
  ctx = ("In the beginning God created the heaven and the earth. And the earth was "
         "without form, and void; and darkness was upon the face of the deep.")
  rec = {"id": "q", "question": "What was created?", "context": ctx,
         "answers": [{"text": "the heaven and the earth", "start": ctx.index("the heaven")}]}
  f = features.qa_features([rec], tok, 32, max_query_len=8, doc_stride=8)
  assert len(f.features) > 2 and f.stats["answer_not_found"] == 0
  found = [(x, m) for x, m in zip(f.features, f.meta) if x["start_position"] > 0]
  assert found
  for x, m in found:
    s, e = int(x["start_position"]) - m["offset"], int(x["end_position"]) - m["offset"]
    assert ctx[m["spans"][s, 0]:m["spans"][e, 1]] == "the heaven and the earth"
  # each context piece is max-context in exactly one window
  counts = np.zeros(len(features.encode_with_offsets(tok, ctx)[0]), int)
  for i, m in enumerate(f.meta):
    start = int(np.searchsorted(  # the window's first piece, from its offsets
        features.encode_with_offsets(tok, ctx)[1][:, 0], m["spans"][0, 0]))
    counts[start:start + len(m["spans"])] += m["max_context"]
  assert (counts == 1).all()
  # decoding: the gold span's logits win; v2 answers "" when [CLS] scores higher
  task = get_config("squad_v2").task
  outs = []
  for x in f.features:
    st, en = np.zeros(len(x["input_ids"])), np.zeros(len(x["input_ids"]))
    st[int(x["start_position"])] += 3
    en[int(x["end_position"])] += 3
    outs.append({"start": st, "end": en})
  assert predictions.qa_predictions([rec], f, outs, task) == {"q": "the heaven and the earth"}
  for o in outs:
    o["start"][0] += 10
  assert predictions.qa_predictions([rec], f, outs, task) == {"q": ""}


def test_tagging_first_piece_labels(tok):
  rec = {"tokens": ["Jerusalem", "is", "Zion", "'s", "city"], "tags": [5, 0, 5, 0, 0]}
  f = features.tagging_features([rec], tok, 64)
  x, m = f.features[0], f.meta[0]
  labels = x["token_labels"]
  assert labels[m["first_pieces"]].tolist() == rec["tags"]
  assert (labels >= 0).sum() == 5 and labels[0] == -1 and labels[-1] == -1
  # words cut by the length are predicted O in the decoded tags
  short = features.tagging_features([rec], tok, 5)
  names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
  logits = np.zeros((len(short.features[0]["input_ids"]), 7))
  logits[:, 5] = 1
  task = get_config("conll2003").task
  result, rows = predictions.evaluate("tagging", [rec], short, [logits], task, names)
  assert rows[0]["predicted_tags"][-1] == "O" and 0 < result["entity_f1"] <= 1


# ----------------------------------------------------------------------------- batching


def test_dynamic_padding_and_buckets():
  assert batching.bucket_length(17, 64, 16, True) == 32
  assert batching.bucket_length(63, 50, 16, True) == 50
  assert batching.bucket_length(3, 64, 16, False) == 64
  feats = [{"input_ids": np.arange(n, dtype=np.int32) + 5,
            "segment_ids": np.zeros(n, np.int32), "label": np.asarray(1, np.int32)}
           for n in (3, 7)]
  b = batching.collate(feats, 8, 4, pad_id=0)
  assert b["input_ids"].shape == (4, 8) and b["attention_mask"][1].sum() == 7
  assert b["example_weight"].tolist() == [1, 1, 0, 0]
  assert b["input_ids"][0, 3:].tolist() == [0] * 5
  lengths = np.random.default_rng(0).integers(4, 64, 1000)
  e0 = batching.epoch_batches(lengths, 32, seed=1, epoch=0, bucket=True, bucket_batches=4)
  assert len(e0) == 1000 // 32
  idx = np.concatenate(e0)
  assert len(np.unique(idx)) == len(idx)
  again = batching.epoch_batches(lengths, 32, seed=1, epoch=0, bucket=True, bucket_batches=4)
  assert all((a == b).all() for a, b in zip(e0, again))  # a resumed run replays it
  padded = [batching.bucket_length(lengths[i].max(), 64, 16, True) for i in e0]
  unbucketed = [batching.bucket_length(lengths[i].max(), 64, 16, True) for i in
                batching.epoch_batches(lengths, 32, 1, 0, bucket=False)]
  assert set(padded) <= {16, 32, 48, 64} and np.mean(padded) < np.mean(unbucketed)
