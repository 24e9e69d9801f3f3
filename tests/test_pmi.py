"""PMI-masking (`mlm.pmi`, objectives/pmi.py): PMI_n against a brute-force count over every
segmentation, the vocabulary's thresholds and shares, the left-to-right units, whole
units masked within MLM's budget, a leak test, and the field built on the bundled corpus
from the training split's statistics."""

from __future__ import annotations

import collections
import itertools
import math

import jax
import numpy as np
import pytest

from bert_jax import train
from bert_jax.data import corpus as corpus_lib
from bert_jax.data import examples as examples_lib
from objectives import pmi
from tests import test_composition
from tests.test_train import SPECIAL


def toy_corpus(sentences: list[list[int]]) -> corpus_lib.TokenizedCorpus:
  """One-token words: every token starts a word."""
  ids = np.concatenate([np.asarray(s, np.int32) for s in sentences])
  offsets = np.concatenate([[0], np.cumsum([len(s) for s in sentences])]).astype(np.int64)
  return corpus_lib.TokenizedCorpus(ids, np.ones(len(ids), bool), offsets,
                                    np.array([0, len(sentences)], np.int64))


def random_sentences(seed=0, n=400):
  """Random words 10..39, with the collocation 5 6 7 planted and 8 9 always together."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    s = list(rng.integers(10, 40, rng.integers(4, 12)))
    if rng.random() < 0.3:
      at = rng.integers(0, len(s))
      s[at:at] = [5, 6, 7]
    if rng.random() < 0.2:
      s.insert(rng.integers(0, len(s)), 8)
      s.insert(s.index(8) + 1, 9)
    out.append([int(x) for x in s])
  return out


def brute_pmi(sentences, gram):
  """PMI_n by counting n-grams inside sentences and trying every segmentation."""
  counts = collections.Counter()
  totals = collections.Counter()
  for s in sentences:
    for k in range(1, len(gram) + 1):
      for i in range(len(s) - k + 1):
        counts[tuple(s[i:i + k])] += 1
        totals[k] += 1

  def logp(g):
    return math.log(counts[tuple(g)] / totals[len(g)])

  n = len(gram)
  best = -math.inf
  for cuts in itertools.product([0, 1], repeat=n - 1):
    if not any(cuts):
      continue
    bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
    best = max(best, sum(logp(gram[a:b]) for a, b in zip(bounds[:-1], bounds[1:])))
  return logp(gram) - best, counts[tuple(gram)]


def test_pmi_n_matches_brute_force_over_segmentations():
  sents = random_sentences()
  for gram in ([5, 6], [5, 6, 7], [8, 9], [6, 7, 8], [5, 6, 7, 12], [10, 11]):
    want, count = brute_pmi(sents, gram)
    assert count > 0
    n = len(gram)
    log_p = {}
    for a, b in itertools.combinations(range(n + 1), 2):
      sub = gram[a:b]
      cnt = sum(1 for s in sents for i in range(len(s) - len(sub) + 1) if s[i:i + len(sub)] == sub)
      tot = sum(max(len(s) - len(sub) + 1, 0) for s in sents)
      log_p[(a, b)] = np.array([math.log(cnt / tot)])
    np.testing.assert_allclose(pmi.pmi_n(log_p, n), [want], rtol=1e-9)


def test_vocabulary_finds_the_planted_collocations_and_keeps_thresholds_and_shares():
  sents = random_sentences()
  corp = toy_corpus(sents)
  vocab = pmi.vocabulary_ngrams(corp, pmi.masking_vocabulary(corp, 3, 10, 800_000))
  words = lambda g: tuple((t,) for t in g)  # noqa: E731  (one-token words)
  assert words([8, 9]) in vocab[2] and words([5, 6]) in vocab[2]
  assert words([5, 6, 7]) in vocab[3]
  # Every entry is seen more than min_count times (brute force), nothing below it.
  counts = collections.Counter(tuple(s[i:i + 2]) for s in sents for i in range(len(s) - 1))
  assert vocab[2] == {words(g) for g, c in counts.items() if c > 10}
  # A small vocabulary keeps the paper's shares and the highest PMI_n of each length.
  # (min_count 3: random bigrams qualify too, and the ranking decides.)
  small = pmi.vocabulary_ngrams(corp, pmi.masking_vocabulary(corp, 3, 3, 8))
  assert len(small[2]) == 4 and len(small[3]) == 2
  assert words([8, 9]) in small[2] and words([5, 6, 7]) in small[3]
  scores = {g: brute_pmi(sents, list(g))[0] for g, c in counts.items() if c > 3}
  assert len(scores) > 20
  top4 = sorted(scores, key=scores.get, reverse=True)[:4]
  assert small[2] == {words(g) for g in top4}


def test_units_are_cut_left_to_right_longest_first_inside_sentences():
  # Vocabulary: "5 6", "6 7", "5 6 7"; sentence 1 ends in 5, sentence 2 starts with 6.
  corp = toy_corpus([[5, 6, 7, 6, 7, 5], [6, 7, 5, 6, 11]])
  words, sentence, _ = pmi.corpus_words(corp)
  key = {n: pmi.ngram_keys(words, sentence, n)[0] for n in (2, 3)}
  vocab = {2: np.sort(key[2][[0, 1]]), 3: key[3][[0]]}  # "5 6", "6 7"; "5 6 7"
  starts, covered = pmi.unit_starts(corp, vocab)
  # [5 6 7] [6 7] [5] | [6 7] [5 6] [11]
  np.testing.assert_array_equal(starts, [1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 1])
  assert covered == pytest.approx(9 / 11)
  # The shared parse (PrepareUnits on the training split: vocabulary and units from one
  # parse) cuts the same units, and keeps the n-gram keys it computed.
  parsed = pmi.Words.of(corp)
  np.testing.assert_array_equal(pmi.unit_starts(corp, vocab, parsed)[0], starts)
  assert sorted(parsed._keys) == [2, 3]


def pmi_batch():
  """test_composition's batch with units of two words each."""
  b = dict(test_composition.clean_batch())
  b["pmi_units"] = np.where(b["word_ids"] >= 0, b["word_ids"] // 2, -1).astype(np.int32)
  return b


def pmi_setup(**mlm):
  c = test_composition.config_for(("mlm",), "")
  c.mlm.pmi = True
  c.mlm.update(mlm)
  return train.build_setup(c, SPECIAL)


def test_whole_units_are_masked_within_the_budget_and_the_target_does_not_leak():
  setup = pmi_setup()
  assert [f.name for f in setup.objectives.example_kind.features] == ["pmi_units"]
  batch = pmi_batch()
  obj = setup.objectives[0].objective
  rates = []
  for seed in range(4):
    inputs = setup.objectives.inputs(train.corrupt(setup, batch, jax.random.PRNGKey(seed)), obj)
    chosen = np.asarray(inputs["mlm_mask"])
    units = batch["pmi_units"]
    for b in range(chosen.shape[0]):
      for u in np.unique(units[b][units[b] >= 0]):
        at = units[b] == u
        picked = chosen[b][at]
        # A unit is masked whole, except one the budget cut at the end (never happens
        # here: units of <= 2 tokens and BERT's budget leave no partial unit at 2).
        assert picked.all() or not picked.any(), (seed, b, u)
      n = int(batch["attention_mask"][b].sum())
      assert chosen[b].sum() <= min(obj.masked.masking.max_predictions, round(0.15 * n))
      rates.append(chosen[b].sum() / (units[b] >= 0).sum())
  assert 0.12 < np.mean(rates) < 0.16
  # Leak: other original ids at the positions replaced by [MASK] give the same encoder
  # input (and the choice of positions does not read the ids), while the targets differ.
  key = jax.random.PRNGKey(7)
  a = setup.objectives.inputs(train.corrupt(setup, batch, key), obj)
  masked = np.asarray(a["input_ids"]) == SPECIAL.mask
  changed = dict(batch, input_ids=np.where(masked, batch["input_ids"] + 1, batch["input_ids"]))
  b = setup.objectives.inputs(train.corrupt(setup, changed, key), obj)
  np.testing.assert_array_equal(np.asarray(a["input_ids"]), np.asarray(b["input_ids"]))
  assert (np.asarray(a["mlm_ids"]) != np.asarray(b["mlm_ids"])).any()
  with pytest.raises(ValueError, match="span"):
    pmi_setup(span="ngram")


def test_units_on_the_bundled_corpus_come_from_the_training_split(bundled_tokenizer, tmp_path):
  from bert_jax.data import pipeline, tokenizer
  from tests.conftest import tiny_config
  tok = tokenizer.load_tokenizer(bundled_tokenizer)
  c = tiny_config(bundled_tokenizer, str(tmp_path / "cache"))
  c.mlm.pmi = True
  kind = train.build_setup(c, train.special_ids(tok)).objectives.example_kind
  ev = pipeline.build_examples(c.data, tok, "eval", seed=0, example_kind=kind,
                               workdir=str(tmp_path))
  ex = [ev[i] for i in range(100)]
  units = np.stack([e["pmi_units"] for e in ex])
  words = np.stack([e["word_ids"] for e in ex])
  np.testing.assert_array_equal(units >= 0, words >= 0)
  # Units are runs of whole words: a word never spans two units.
  for u, w in zip(units, words):
    real = w >= 0
    starts_u = np.r_[True, u[real][1:] != u[real][:-1]]
    starts_w = np.r_[True, w[real][1:] != w[real][:-1]]
    assert not (starts_u & ~starts_w).any()
  per_word = [len(np.unique(u[u >= 0])) / len(np.unique(w[w >= 0])) for u, w in zip(units, words)]
  assert 0.5 < np.mean(per_word) < 0.95  # collocations join words, not everything
  # The eval split's units use the training split's vocabulary, not the eval corpus' own
  # (36 chapters: far fewer n-grams seen more than 10 times).
  train_corpus = pipeline.build_examples(c.data, tok, "train", seed=0, example_kind=kind,
                                         workdir=str(tmp_path)).corpus
  prepare = pmi.PrepareUnits(5, 10, 800_000)
  from_train = prepare(examples_lib.FeatureContext(ev.corpus, tok, lambda: train_corpus))
  from_own = prepare(examples_lib.FeatureContext(ev.corpus, tok))

  def units_of(i, make):
    return examples_lib.make_example(ev.corpus, ev.plan, i, tok, features=[("u", make)])["u"]
  for i in range(100):
    np.testing.assert_array_equal(units_of(i, from_train), units[i])
  assert any((units_of(i, from_own) != units[i]).any() for i in range(100))
