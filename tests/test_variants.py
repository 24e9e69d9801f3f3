"""The objective variants of issue #22 (wso, tdd, cap, tdr, sso, sdp, sro; MLM's [UNK]
option): corruption and planning statistics against each paper's recipe, leak tests (the
target cannot be read from what the encoder sees), and each variant beside MLM either
valid (each loss what it gives alone) or refused, with test_composition's check."""

from __future__ import annotations

import itertools
import math

import jax
import numpy as np
import pytest

import objectives
from bert_jax import train
from bert_jax.data import examples as examples_lib
from objectives import cap, sdp, sro, sso, tdd, tdr, wso
from tests import test_composition
from tests.conftest import tiny_config
from tests.test_pairs import Specials, doc_of_token, make_corpus
from tests.test_train import SPECIAL, random_batch

VARIANTS = ("wso", "tdd", "cap", "tdr", "sso", "sdp", "sro")
SEQ_LEN = 64


# ----------------------------------------------------------------------------- composition
# test_composition.py's check (a fixed batch and key; each objective's metrics beside MLM
# equal its metrics alone, with the same parameters), for the variants; the slow pair walk
# there covers every pair of registered objectives.


def config_for(names):
  return test_composition.config_for(names, "")


def check(names, cache):
  assert test_composition.check(names, "", cache) == "valid", names
  return train.build_setup(config_for(names), SPECIAL)


def test_each_variant_beside_mlm():
  assert set(VARIANTS) <= set(objectives.available())
  cache: dict = {}
  for v in VARIANTS:
    check(("mlm", v), cache)
  # Features merge into any layout; two token-level variants on their own passes.
  setup = check(("mlm", "cap", "tdr"), cache)
  assert {f.name for f in setup.objectives.example_kind.features} == {
      "cap_labels", "uncased_ids", "tdr_labels"}


def test_sentence_kinds_refuse_each_other():
  for a, b in itertools.combinations(("nsp", "sso", "sdp", "sro"), 2):
    with pytest.raises(ValueError, match="need different kinds of examples"):
      train.build_setup(config_for(("mlm", a, b)), SPECIAL)


def test_missing_features_are_filled_for_shape_only_batches():
  setup = train.build_setup(config_for(("mlm", "cap", "tdr")), SPECIAL)
  dummy = train.dummy_batch(2, 16, setup.objectives.example_kind.name)
  batch = train.corrupt(setup, dummy, jax.random.PRNGKey(0))
  assert (np.asarray(batch["clean"]["cap_labels"]) == -1).all()
  assert batch["clean"]["tdr_labels"].shape == (2, 16)


# ----------------------------------------------------------------------------- MLM [UNK]


def test_mlm_replace_with_unk():
  c = config_for(("mlm",))
  c.mlm.replace_with = "unk"
  setup = train.build_setup(c, SPECIAL)
  batch = test_composition.clean_batch()
  inputs = setup.objectives.inputs(train.corrupt(setup, batch, jax.random.PRNGKey(3)),
                                   setup.objectives[0].objective)
  ids = np.asarray(inputs["input_ids"])
  chosen = np.asarray(inputs["mlm_mask"])
  assert not (ids == SPECIAL.mask).any()
  frac = (ids[chosen] == SPECIAL.unk).mean()
  assert 0.6 < frac < 0.95, frac
  c.mlm.replace_with = "blank"
  with pytest.raises(ValueError, match="replace_with"):
    train.build_setup(c, SPECIAL)


# ----------------------------------------------------------------------------- wso


def long_batch(batch=64, length=128, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.arange(5, 5 + batch * length)).reshape(batch, length) % 100_000
  ids = ids.astype(np.int32)
  word_ids = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  ids[:, 0], ids[:, -1] = 2, 3
  word_ids[:, 0] = word_ids[:, -1] = -1
  return {"input_ids": ids, "segment_ids": np.zeros_like(ids),
          "attention_mask": np.ones_like(ids), "word_ids": word_ids,
          "example_id": np.arange(batch, dtype=np.int32)}


def test_wso_statistics_and_leak():
  b = long_batch()
  view = wso.ShuffledView(0.05, 3, 40, None)
  out = jax.device_get(view.make(b, jax.random.PRNGKey(0)))
  ids, pos, w = b["input_ids"], out["wso_positions"], out["wso_weights"]
  n_real = (b["word_ids"] >= 0).sum()
  # 5% of the positions start a shuffled trigram: 15% of the tokens are targets.
  assert abs(w.sum() / n_real - 0.15) < 0.015, w.sum() / n_real
  copy_right = total = 0
  for i in range(len(ids)):
    p = pos[i][w[i] > 0].reshape(-1, 3)
    assert (np.diff(p, axis=1) == 1).all() and len(set(p.ravel())) == p.size  # disjoint
    assert (b["word_ids"][i][p] >= 0).all()  # never [CLS]/[SEP]
    for tri in p:
      before, after = ids[i][tri], out["input_ids"][i][tri]
      assert sorted(before) == sorted(after) and (before != after).any()  # reordered
      np.testing.assert_array_equal(out["wso_ids"][i][w[i] > 0].reshape(-1, 3)[
          list(map(tuple, p)).index(tuple(tri))], before)
      copy_right += (before == after).sum()
      total += 3
    untouched = np.ones(ids.shape[1], bool)
    untouched[p.ravel()] = False
    np.testing.assert_array_equal(out["input_ids"][i][untouched], ids[i][untouched])
  # Leak: copying the input at a target is right only at a permutation's fixed points.
  assert abs(copy_right / total - 0.2) < 0.03, copy_right / total


def test_wso_masked_input_shuffles_unmasked_tokens_only():
  obj = objectives.get("wso").from_config(config_for(("wso",)), SPECIAL)
  b = long_batch(16)
  out = jax.device_get(obj.view().make(b, jax.random.PRNGKey(1)))
  masked = out["input_ids"] == SPECIAL.mask
  assert masked.mean() > 0.05
  tgt = np.zeros_like(masked)
  for i in range(len(masked)):
    tgt[i][out["wso_positions"][i][out["wso_weights"][i] > 0]] = True
  assert not (tgt & masked).any()


# ----------------------------------------------------------------------------- tdd


def test_tdd_statistics_labels_and_leak():
  b = long_batch()
  view = tdd.DeletedView(0.15, 0)
  out = jax.device_get(view.make(b, jax.random.PRNGKey(0)))
  cand = (b["word_ids"] >= 0).sum()
  kept = out["attention_mask"].sum()
  assert abs((b["attention_mask"].sum() - kept) / cand - 0.15) < 0.01
  for i in range(len(b["input_ids"])):
    n = out["attention_mask"][i].sum()
    assert out["attention_mask"][i][:n].all() and not out["attention_mask"][i][n:].any()
    ids = out["input_ids"][i][:n]
    assert ids[0] == 2 and ids[-1] == 3
    # The kept tokens are the original ones, in order; label = "something deleted before".
    orig = list(b["input_ids"][i])
    where = [orig.index(t) for t in ids]
    assert where == sorted(where)
    labels = [int(j > 0 and where[j] - where[j - 1] > 1) for j in range(n)]
    np.testing.assert_array_equal(out["tdd_labels"][i][:n], labels)
    assert out["tdd_weights"][i][0] == 0 and out["tdd_weights"][i][1:n].all()
  frac = out["tdd_labels"].sum() / out["tdd_weights"].sum()
  assert abs(frac - 0.15) < 0.02, frac  # chance by the majority class: about 0.85
  # Leak: what was deleted is not in the input: changing a deleted token changes nothing.
  deleted = ~np.isin(b["input_ids"][0], out["input_ids"][0])
  b2 = {k: v.copy() for k, v in b.items()}
  b2["input_ids"][0][deleted] = 7
  out2 = jax.device_get(view.make(b2, jax.random.PRNGKey(0)))
  for k in ("input_ids", "attention_mask", "segment_ids", "tdd_labels"):
    np.testing.assert_array_equal(out[k], out2[k])


def test_tdd_view_moves_segments_and_mask_into_the_encoder():
  setup = train.build_setup(config_for(("tdd",)), SPECIAL)
  batch = train.corrupt(setup, test_composition.clean_batch(), jax.random.PRNGKey(0))
  view = batch["views"][0]
  assert (np.asarray(view["attention_mask"]).sum(1)
          < np.asarray(test_composition.clean_batch()["attention_mask"]).sum(1)).all()
  assert set(np.unique(np.asarray(view["segment_ids"]))) <= {0, 1}


def cyclic_batch(seed, period=8):
  """test_train's random batch with the regular tokens of a cyclic language (token
  5 + (start + i) % period at position i): every deletion breaks the cycle, so it is
  visible from the token and its left neighbour."""
  b = random_batch(seed, batch=32, length=SEQ_LEN)
  start = np.random.default_rng(seed).integers(0, period, size=(32, 1))
  cycle = 5 + (start + np.arange(SEQ_LEN)) % period
  b["input_ids"] = np.where(b["word_ids"] >= 0, cycle, b["input_ids"]).astype(np.int32)
  return b


@pytest.mark.slow
def test_tdd_learns_where_the_neighbour_is_in_the_input():
  """The learnability check of tdd's view, head and loss: with MobileBERT's trigram input
  (each position's input holds its neighbours' embeddings) the detector finds the
  deletions of a cyclic language within 600 steps (AUC > 0.9). Without it, the same
  tiny encoder stays at the label prior for 1,500 steps (docs/objectives.md): a
  deletion leaves no trace in the bag of tokens, so there is no first-order gradient to
  grow attention to the previous token from."""
  c = config_for(("tdd",))
  c.model.update(dict(trigram_input=True, project_word_embeddings=True))
  c.optim.update(dict(warmup_steps=30, lr=1e-3))
  c.train.steps = 600
  setup = train.build_setup(c, SPECIAL)
  params = test_composition.init_params(setup, cyclic_batch(0))
  state = train.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                           opt_state=setup.tx.init(params), rng=jax.random.PRNGKey(0))
  step = jax.jit(lambda s, b: train.train_step(s, b, setup))
  evaluate = jax.jit(lambda p, b: train.eval_step(p, b, jax.random.PRNGKey(5), setup))
  held_out = cyclic_batch(10_000)
  before = evaluate(state.params, held_out)["tdd/disc_auc"]
  for i in range(c.train.steps):
    state, _ = step(state, cyclic_batch(1 + i))
  after = evaluate(state.params, held_out)
  auc = float(after["tdd/disc_auc"][0] / after["tdd/disc_auc"][1])
  assert abs(float(before[0] / before[1]) - 0.5) < 0.1 and auc > 0.9, auc


# ----------------------------------------------------------------------------- cap


PIECES = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "\u2581The", "\u2581the", "\u2581NASA",
          "\u2581dog", "s", "\u2581", "Paris", "paris", ",", "\u2581Dog"]


class FakeTokenizer:
  def pieces(self):
    return PIECES


def test_cap_tables_labels_and_leak():
  case, uncased = cap.case_tables(PIECES)
  assert case[5] == 1 and case[6] == 0 and case[7] == -1 and case[9] == 0 and case[13] == -1
  assert uncased[5] == 6 and uncased[14] == 8 and uncased[7] == 7 and uncased[11] == 12
  ids = np.array([2, 5, 8, 9, 10, 11, 13, 7, 14, 3, 0], np.int32)
  ws = np.array([1, 1, 0, 1, 0, 0, 1, 1], bool)  # corpus word starts of the 8 tokens
  corp = examples_lib.TokenizedCorpus(ids[1:9], ws, np.array([0, 8]), np.array([0, 1]))
  ctx = examples_lib.FeatureContext(corp, FakeTokenizer())
  offsets = np.array([-1, 0, 1, 2, 3, 4, 5, 6, 7, -1, -1])
  labels = cap.LABELS.prepare(ctx)({"input_ids": ids}, offsets)
  # The, dog (start), s (not), bare marker, Paris (after the marker), ",", NASA, Dog
  np.testing.assert_array_equal(labels, [-1, 1, 0, -1, -1, 1, -1, -1, 1, -1, -1])
  unc = cap.UNCASED.prepare(ctx)({"input_ids": ids}, offsets)
  # Leak: at every labelled position the uncased input is the same for either case.
  for p in np.flatnonzero(labels >= 0):
    twin = {5: 6, 6: 6, 14: 8, 8: 8, 11: 12}[int(ids[p])]
    assert unc[p] == twin
  assert (case[unc[labels >= 0]] != 1).all()  # no labelled input is still capitalized


def test_cap_on_bundled_corpus(bundled_tokenizer, tmp_path):
  from bert_jax.data import pipeline, tokenizer
  tok = tokenizer.load_tokenizer(bundled_tokenizer)
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"))
  c.objectives = "mlm:1.0,cap:1.0,tdr:1.0"
  kind = objectives.build(c, train.special_ids(tok)).example_kind
  ex = pipeline.build_examples(c.data, tok, "eval", seed=0, example_kind=kind,
                               workdir=str(tmp_path))
  labels = np.stack([ex[i]["cap_labels"] for i in range(200)])
  unc = np.stack([ex[i]["uncased_ids"] for i in range(200)])
  case, _ = cap.case_tables(tok.pieces())
  frac = (labels == 1).sum() / (labels >= 0).sum()
  assert 0.05 < frac < 0.4, frac  # the majority class ("lowercase") is the chance level
  assert (case[unc[labels >= 0]] != 1).all()
  tdr_labels = np.stack([ex[i]["tdr_labels"] for i in range(200)])
  ids = np.stack([ex[i]["input_ids"] for i in range(200)])
  np.testing.assert_array_equal(tdr_labels == -1, np.isin(ids, [tok.cls_id, tok.sep_id,
                                                                tok.pad_id]))


# ----------------------------------------------------------------------------- tdr


def test_tdr_labels_brute_force_and_leak():
  corp = make_corpus(30)
  plan = examples_lib.plan_single(corp, SEQ_LEN, "doc_sentences")
  # Random ids from a small vocabulary, so that labels are mixed.
  rng = np.random.default_rng(0)
  corp = examples_lib.TokenizedCorpus(rng.integers(5, 305, corp.ids.shape).astype(np.int32), corp.word_start, corp.sent_offsets,
                                      corp.doc_offsets)
  make = tdr.LABELS.prepare(examples_lib.FeatureContext(corp, None))
  ones = total = 0
  for i in range(0, len(plan), 7):
    ex = examples_lib.make_example(corp, plan, i, Specials, features=[("tdr_labels", make)])
    s, e = plan.spans[i]
    d = doc_of_token(corp, np.array([s]))[0]
    d0, d1 = corp.doc_token_offsets[d], corp.doc_token_offsets[d + 1]
    rest = set(corp.ids[d0:s].tolist()) | set(corp.ids[e:d1].tolist())
    n = e - s
    want = [int(t in rest) for t in corp.ids[s:e]]
    np.testing.assert_array_equal(ex["tdr_labels"][1:1 + n], want)
    assert (ex["tdr_labels"][1 + n:] == -1).all() and ex["tdr_labels"][0] == -1
    ones += sum(want)
    total += n
  assert 0.2 < ones / total < 0.95
  # Leak: the label reads the document outside the example: changing it changes labels
  # while the example's input stays the same.
  i = 3
  s, e = plan.spans[i]
  d = doc_of_token(corp, np.array([s]))[0]
  d0, d1 = corp.doc_token_offsets[d], corp.doc_token_offsets[d + 1]
  ids2 = corp.ids.copy()
  ids2[d0:s] = 4
  ids2[e:d1] = 4
  corp2 = examples_lib.TokenizedCorpus(ids2, corp.word_start, corp.sent_offsets,
                                       corp.doc_offsets)
  a = examples_lib.make_example(corp, plan, i, Specials, features=[("tdr_labels", make)])
  b = examples_lib.make_example(corp2, plan, i, Specials, features=[
      ("tdr_labels", tdr.LABELS.prepare(examples_lib.FeatureContext(corp2, None)))])
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  assert (b["tdr_labels"] <= 0).all() and (a["tdr_labels"] == 1).any()


# ----------------------------------------------------------------------------- sentence level


@pytest.fixture(scope="module")
def corpus():
  return make_corpus(300)


def parts_of(ex):
  """Corpus token indices of each segment, and the segment ids, read from the example."""
  ids, n = ex["input_ids"], int(ex["attention_mask"].sum())
  seps = np.flatnonzero(ids[:n] == Specials.sep_id)
  bounds = [0, *seps.tolist()]
  parts = [ids[a + 1:b].astype(np.int64) - 5 for a, b in zip(bounds[:-1], bounds[1:])]
  segs = [int(ex["segment_ids"][a + 1]) for a in bounds[:-1]]
  for p in parts:
    assert len(p) and (np.diff(p) == 1).all()
  return parts, segs


def plan_and_examples(corpus, obj_kind, seed=0):
  plan = examples_lib.plan_segments(corpus, SEQ_LEN, obj_kind, short_seq_prob=0.1, seed=seed)
  return plan, [examples_lib.make_example(corpus, plan, i, Specials) for i in range(len(plan))]


def test_sso_labels(corpus):
  plan, exs = plan_and_examples(corpus, sso.SentenceStructure.example_kind)
  counts = np.bincount(plan.labels, minlength=3) / len(plan)
  assert np.allclose(counts, 1 / 3, atol=0.04), counts
  for ex in exs:
    (a, b), segs = parts_of(ex)
    assert segs == [0, 1]  # the segment ids do not depend on the label
    da, db = doc_of_token(corpus, a[[0]])[0], doc_of_token(corpus, b[[0]])[0]
    label = int(ex["sentence_label"])
    if label == 2:
      assert da != db
    else:
      assert da == db
      first, second = (a, b) if label == 0 else (b, a)
      assert first[-1] < second[0]  # next (0): B after A; previous (1): B before A
      if len(a) + len(b) < SEQ_LEN - 3:
        assert first[-1] + 1 == second[0]  # untruncated: adjacent


def test_sdp_labels(corpus):
  plan, exs = plan_and_examples(corpus, sdp.SentenceDistance.example_kind)
  counts = np.bincount(plan.labels, minlength=3) / len(plan)
  assert np.allclose(counts, 1 / 3, atol=0.05), counts
  starts = set(corpus.sent_offsets.tolist())
  for ex in exs:
    (a, b), segs = parts_of(ex)
    assert segs == [0, 1]
    da, db = doc_of_token(corpus, a[[0]])[0], doc_of_token(corpus, b[[0]])[0]
    label = int(ex["sentence_label"])
    assert (da == db) == (label < 2)
    if label == 0 and len(a) + len(b) < SEQ_LEN - 3:
      assert a[-1] + 1 == b[0]
    if label == 1:  # at least one whole sentence between them
      lo, hi = (a, b) if a[-1] < b[0] else (b, a)
      between = [s for s in starts if lo[-1] < s <= hi[0]]
      assert len(between) >= 2, (lo[-1], hi[0])


def test_sro_permutations(corpus):
  kind = sro.SentenceReordering(None, 3).example_kind
  assert kind == sro.SentenceReordering(None, 3).example_kind  # equal planners: one kind
  plan, exs = plan_and_examples(corpus, kind)
  assert sro.num_classes_for(3) == 9
  counts = np.bincount(plan.labels, minlength=9) / len(plan)
  # n uniform on 1..3, then the n! orders uniform.
  want = np.array([1 / 3] + [1 / 6] * 2 + [1 / 18] * 6)
  assert np.allclose(counts, want, atol=0.03), counts
  perms = {n: list(itertools.permutations(range(n))) for n in (1, 2, 3)}
  for ex in exs:
    parts, segs = parts_of(ex)
    n = len(parts)
    assert segs == [i % 2 for i in range(n)]  # by place, not by original order: no leak
    label = int(ex["sentence_label"])
    offset = sum(math.factorial(j) for j in range(1, n))
    perm = perms[n][label - offset]
    original = [None] * n
    for place, p in enumerate(perm):
      original[p] = parts[place]
    text = np.concatenate(original)
    assert (np.diff(text) == 1).all()  # put back in order: one contiguous run
    assert len(set(doc_of_token(corpus, text).tolist())) == 1


def test_planned_kinds_through_the_builder(bundled_tokenizer, tmp_path):
  from bert_jax.data import pipeline, tokenizer
  tok = tokenizer.load_tokenizer(bundled_tokenizer)
  for name in ("sso", "sdp", "sro"):
    c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"))
    c.objectives = f"mlm:1.0,{name}:1.0"
    kind = objectives.build(c, train.special_ids(tok)).example_kind
    ex = pipeline.build_examples(c.data, tok, "eval", seed=0, example_kind=kind,
                                 workdir=str(tmp_path))
    assert ex.stats["label_fractions"] and ex.kind == kind.name
    e = ex[0]
    assert e["input_ids"].shape == (64,) and "sentence_label" in e


def test_planner_refusals(corpus):
  def bad(corpus, seq_len, rng, short_seq_prob):
    return [([(0, seq_len, 0)], 0)]
  kind = objectives.ExampleKind("bad", segments=2, planner=bad)
  with pytest.raises(ValueError, match="tokens"):
    examples_lib.plan_segments(corpus, SEQ_LEN, kind)
  with pytest.raises(ValueError, match="pairs need a negative"):
    objectives.ExampleKind("pair", segments=2)


# ----------------------------------------------------------------------------- the grid


def test_variants_grid_builds_and_every_cell_composes(tmp_path):
  from bert_jax import ablate
  from configs import ablate as ablate_configs
  grid = ablate_configs.get_config("variants")
  assert grid.budget.kind == "flops" and grid.finetune.seeds == "0,1,2,3,4"
  names = grid.order.split(",")
  assert names[0] == "mlm" and set(names) == {"mlm", "mlm_unk", "mlm_pmi"} | {
      f"mlm_{v}" for v in VARIANTS}
  for name in names:
    cell = grid.cells[name]
    from configs.pretrain import get_config
    config = get_config(cell.preset)
    ablate.apply_overrides(config, cell.overrides)
    comp = objectives.build(config, SPECIAL)
    assert [w.objective.name for w in comp][0] == "mlm"
    assert comp.example_kind is not None


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_every_variant_pretrains_alone_exports_and_fine_tunes(bundled_tokenizer, tmp_path):
  """Each variant alone (and MLM with PMI units or [UNK]) through 2 steps of pretraining
  on the bundled corpus, Hugging Face export of its encoder (equal outputs in
  transformers), and fine-tuning from its checkpoint: nothing outside objectives/ and
  configs/ knows them. (Beside MLM, through the ablation: the variants grid.)"""
  import torch
  import transformers
  from bert_jax import checkpoint, hf
  from bert_jax.encoder import Encoder, EncoderConfig
  from bert_jax.finetune import loop
  from tests.conftest import tiny_config
  from tests.test_finetune_run import ft_config

  runs = {v: (f"{v}:1.0", {}) for v in VARIANTS}
  runs.update({"mlm_pmi": ("mlm:1.0", {"pmi": True}), "mlm_unk": ("mlm:1.0",
                                                                  {"replace_with": "unk"})})
  ids = np.array([[2, 40, 41, 42, 43, 3, 0, 0]], np.int32)
  for name, (spec, mlm) in runs.items():
    c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"))
    c.objectives = spec
    c.mlm.update(mlm)
    c.train.update(dict(steps=2, eval_every=2, checkpoint_every=2))
    wd = str(tmp_path / name)
    s = train.train_and_evaluate(c, wd)
    assert s.steps == 2 and all(np.isfinite(v) for v in s.last_eval.values()), name
    prefix = spec.split(":")[0]
    assert any(k.startswith(prefix + "/") for k in s.last_eval), (name, sorted(s.last_eval))
    out = str(tmp_path / f"{name}_hf")
    hf.export_from_workdir(wd, out)
    ref = transformers.AutoModel.from_pretrained(out).eval()
    params, _ = checkpoint.restore_params(wd)
    cfg = EncoderConfig.from_dict(train.run_config.load(wd).model.to_dict())
    mask = (ids > 0).astype(np.int32)
    ours = Encoder(cfg).apply({"params": params["encoder"]}, ids, np.zeros_like(ids), mask,
                              deterministic=True)["hidden_states"]
    with torch.no_grad():
      theirs = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours)[mask > 0], theirs[mask > 0], atol=2e-4,
                               err_msg=name)
  ft = loop.finetune(ft_config(str(tmp_path / "sro"), steps=2), str(tmp_path / "ft"),
                     quiet=True)
  assert ft.steps == 2 and 0.0 <= ft.best["accuracy"] <= 1.0
