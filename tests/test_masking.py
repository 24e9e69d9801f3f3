"""Statistical tests of objectives/masking.py against what BERT / ALBERT / SpanBERT do."""

import functools

import jax
import numpy as np
import pytest

from objectives import masking
from objectives.masking import MaskingConfig, mask_batch, select_positions

PAD, CLS, SEP, MASK = 0, 1, 2, 3
FIRST_REGULAR = 5
VOCAB = 30000
B, L = 1024, 128


def make_batch(seed, batch, length, *, max_pieces=1, min_len=12, full=False):
  """[CLS] A [SEP] B [SEP] [PAD]..., words of 1..max_pieces pieces, word ids ascending
  through both segments, -1 on [CLS]/[SEP]/[PAD]."""
  rng = np.random.default_rng(seed)
  ids = np.full((batch, length), PAD, np.int32)
  words = np.full((batch, length), -1, np.int32)
  attn = np.zeros((batch, length), np.int32)
  for b in range(batch):
    n = length if full else int(rng.integers(min_len, length + 1))
    sep_a = int(rng.integers(2, n - 2))  # position of the first [SEP]
    ids[b, :n] = rng.integers(FIRST_REGULAR, VOCAB, n)
    ids[b, 0], ids[b, sep_a], ids[b, n - 1] = CLS, SEP, SEP
    attn[b, :n] = 1
    w, i = 0, 1
    while i < n - 1:
      if i == sep_a:
        i += 1
        continue
      end = min(i + int(rng.integers(1, max_pieces + 1)), sep_a if i < sep_a else n - 1)
      words[b, i:end] = w
      w, i = w + 1, end
  return ids, words, attn


def budget(n_real, cfg):
  return np.array([min(cfg.max_predictions, max(1, int(round(n * cfg.rate))))
                   for n in n_real])


@functools.lru_cache(maxsize=None)
def _jitted_mask_batch(cfg, mask_id, first_regular_id, vocab_size):
  return jax.jit(functools.partial(mask_batch, cfg=cfg, mask_id=mask_id,
                                   first_regular_id=first_regular_id, vocab_size=vocab_size))


def run_mask(cfg, ids, words, attn, seed=0, *, mask_id=MASK, first_regular_id=FIRST_REGULAR,
             vocab_size=VOCAB):
  fn = _jitted_mask_batch(cfg, mask_id, first_regular_id, vocab_size)
  keys = jax.random.split(jax.random.key(seed), ids.shape[0])
  return jax.tree.map(np.asarray, fn(keys, ids, words, attn))


def run_select(cfg, words, attn, seed=0):
  fn = jax.jit(jax.vmap(functools.partial(select_positions, cfg=cfg)))
  keys = jax.random.split(jax.random.key(seed), words.shape[0])
  return np.asarray(fn(keys, words, attn))


def run_lengths(mask):
  """Lengths of the maximal runs of True along the last axis, all rows together."""
  m = np.asarray(mask).astype(np.int8)
  pad = np.zeros((m.shape[0], 1), np.int8)
  d = np.diff(np.concatenate([pad, m, pad], axis=1), axis=1)
  return np.nonzero(d == -1)[1] - np.nonzero(d == 1)[1]


def expected_run_freqs(p, total):
  """Expected share of runs of each length 1..total when spans n ~ p are drawn one after
  another, each shortened to what is left of a budget of `total` tokens (ALBERT's rule),
  and no two spans touch (true up to a few percent for a low rate on a long sequence)."""
  memo = {0: np.zeros(total + 1)}

  def counts(r):
    if r not in memo:
      v = np.zeros(total + 1)
      for n, pn in enumerate(p, start=1):
        k = min(n, r)
        v[k] += pn
        v += pn * counts(r - k)
      memo[r] = v
    return memo[r]

  c = counts(total)
  return c[1:] / c.sum()


@pytest.fixture(scope="module")
def data():
  return make_batch(0, B, L)


@pytest.fixture(scope="module")
def default_out(data):
  return run_mask(MaskingConfig(), *data)


@pytest.fixture(scope="module")
def long_seq():
  """512 tokens: [CLS] 510 one-piece words [SEP]."""
  length, batch = 512, 1024
  words = np.tile(np.arange(length, dtype=np.int32) - 1, (batch, 1))
  words[:, 0] = words[:, -1] = -1
  return words, np.ones((batch, length), np.int32)


# ---------------------------------------------------------------- budget and candidates


def test_token_masking_count_is_exactly_the_budget(data, default_out):
  ids, words, attn = data
  want = budget(attn.sum(1), MaskingConfig())
  assert len(set(want)) > 10  # lengths vary, so do budgets (1..19)
  np.testing.assert_array_equal(default_out["mlm_mask"].sum(1), want)
  np.testing.assert_array_equal(default_out["mlm_weights"].sum(1), want)


def test_budget_uses_bert_rounding():
  # min(P, max(1, round(n * rate))) with Python's round on float64, as BERT computes it.
  lengths = [3, 10, 30, 50, 95, 128]
  words = np.full((len(lengths), L), -1, np.int32)
  attn = np.zeros((len(lengths), L), np.int32)
  for i, n in enumerate(lengths):
    words[i, 1:n - 1] = np.arange(n - 2)
    attn[i, :n] = 1
  # 0.15: 3 -> 1 (at least one), 10 * 0.15 = 1.5 -> 2, 30 * 0.15 = 4.5 -> 4 (half to even).
  got = run_select(MaskingConfig(max_predictions=40), words, attn).sum(1)
  np.testing.assert_array_equal(got, [1, 2, 4, 8, 14, 19])
  # 0.3: 95 * 0.3 = 28.499999999999996 -> 28, where float32 gives 28.500002 -> 29; P caps.
  assert round(float(np.float32(95) * np.float32(0.3))) == 29
  got = run_select(MaskingConfig(rate=0.3, max_predictions=30), words, attn).sum(1)
  np.testing.assert_array_equal(got, [1, 3, 9, 15, 28, 30])


@pytest.mark.parametrize("cfg", [
    MaskingConfig(whole_word=True),
    MaskingConfig(span="ngram"),
    MaskingConfig(span="geometric", whole_word=True),
], ids=["whole_word", "ngram", "geometric_ww"])
def test_never_more_than_budget_and_rate_on_long_sequences(cfg):
  ids, words, attn = make_batch(1, 256, 512, max_pieces=4, full=True)
  cfg = MaskingConfig(**{**cfg.__dict__, "max_predictions": 80})
  got = run_select(cfg, words, attn).sum(1)
  want = budget(attn.sum(1), cfg)  # 77 everywhere
  assert (got <= want).all()
  assert abs(got.mean() / 512 - cfg.rate) < 0.005, got.mean() / 512
  if not cfg.whole_word:  # token units: the last span is shortened to fill the budget
    np.testing.assert_array_equal(got, want)


def test_special_and_padding_tokens_never_chosen(data, default_out):
  ids, words, attn = data
  chosen = default_out["mlm_mask"]
  assert not chosen[words < 0].any()
  assert not chosen[attn == 0].any()
  assert (attn == 0).any() and (words < 0).sum() > 3 * B  # the batch has both kinds
  # Padding is excluded by the attention mask even if its word ids look regular.
  words2 = np.where(attn == 0, 10_000, words)
  out = run_mask(MaskingConfig(span="ngram", whole_word=True, rate=0.5, max_predictions=80),
                 ids, words2, attn)
  assert not out["mlm_mask"][attn == 0].any()
  assert not out["mlm_mask"][ids == CLS].any() and not out["mlm_mask"][ids == SEP].any()


# ---------------------------------------------------------------- corruption


def test_80_10_10_split(data, default_out):
  ids, _, _ = data
  chosen = default_out["mlm_mask"]
  new = default_out["input_ids"][chosen]
  old = ids[chosen]
  assert chosen.sum() > 10_000  # standard error of a 10% share: 0.3 points
  masked = np.mean(new == MASK)
  random = np.mean((new != MASK) & (new != old))
  kept = np.mean(new == old)
  assert abs(masked - 0.8) < 0.015, masked
  assert abs(random - 0.1) < 0.015, random
  assert abs(kept - 0.1) < 0.015, kept
  replaced = new[(new != MASK) & (new != old)]
  assert (replaced >= FIRST_REGULAR).all() and (replaced < VOCAB).all()


def test_electra_split_has_no_random_replacements(data):
  out = run_mask(MaskingConfig(mask_prob=0.85, random_prob=0.0), *data)
  chosen = out["mlm_mask"]
  new, old = out["input_ids"][chosen], data[0][chosen]
  assert np.all((new == MASK) | (new == old))
  assert abs(np.mean(new == MASK) - 0.85) < 0.015


def test_random_replacements_are_uniform_regular_ids(data):
  ids, words, attn = data
  vocab = FIRST_REGULAR + 20  # a small vocabulary so that every id is drawn often
  out = run_mask(MaskingConfig(mask_prob=0.0, random_prob=1.0, max_predictions=20),
                 ids % 4, words, attn, vocab_size=vocab)  # originals are all special
  drawn = out["input_ids"][out["mlm_mask"]]
  assert drawn.min() >= FIRST_REGULAR and drawn.max() < vocab
  freq = np.bincount(drawn - FIRST_REGULAR, minlength=20) / drawn.size
  np.testing.assert_allclose(freq, 1 / 20, atol=0.01)


def test_gathered_targets_agree_with_mask_and_input(data, default_out):
  ids, _, _ = data
  o = default_out
  pos, w = o["mlm_positions"], o["mlm_weights"]
  assert pos.shape == (B, 20) and o["mlm_ids"].shape == (B, 20) and w.shape == (B, 20)
  assert pos.dtype == np.int32 and o["mlm_ids"].dtype == np.int32
  assert w.dtype == np.float32 and o["input_ids"].dtype == np.int32
  assert o["mlm_mask"].dtype == bool and o["mlm_mask"].shape == (B, L)
  assert set(np.unique(w)) == {0.0, 1.0}
  real = w == 1.0
  # Real slots come first, in ascending position order; padding slots point at 0.
  assert np.all(np.diff(real.astype(int), axis=1) <= 0)
  assert np.all(np.diff(pos, axis=1)[real[:, 1:]] > 0)
  assert np.all(pos[~real] == 0)
  np.testing.assert_array_equal(o["mlm_ids"], np.take_along_axis(ids, pos, 1))
  rebuilt = np.zeros((B, L), bool)
  rebuilt[np.nonzero(real)[0], pos[real]] = True
  np.testing.assert_array_equal(rebuilt, o["mlm_mask"])
  np.testing.assert_array_equal(o["input_ids"][~o["mlm_mask"]], ids[~o["mlm_mask"]])


def test_chosen_but_not_gathered_is_not_corrupted(data, monkeypatch):
  # Force more chosen positions than max_predictions: only the gathered ones count.
  ids, words, attn = data
  monkeypatch.setattr(masking, "select_positions",
                      lambda key, w, a, cfg: (w >= 0) & (a > 0))
  fn = jax.jit(functools.partial(  # traced here, with the patch (not the cached ones)
      mask_batch, cfg=MaskingConfig(mask_prob=1.0, random_prob=0.0, max_predictions=5),
      mask_id=MASK, first_regular_id=FIRST_REGULAR, vocab_size=VOCAB))
  out = jax.tree.map(np.asarray, fn(jax.random.split(jax.random.key(0), 64),
                                    ids[:64], words[:64], attn[:64]))
  assert (out["mlm_weights"].sum(1) == 5).all()
  assert (out["mlm_mask"].sum(1) == 5).all()
  assert ((out["input_ids"] == MASK).sum(1) == 5).all()
  np.testing.assert_array_equal(out["input_ids"] == MASK, out["mlm_mask"])


# ---------------------------------------------------------------- whole words and spans


@pytest.mark.parametrize("span", ["none", "ngram", "geometric"])
def test_whole_words_are_never_split(span):
  ids, words, attn = make_batch(2, 512, L, max_pieces=4)
  cfg = MaskingConfig(whole_word=True, span=span, rate=0.3, max_predictions=40)
  chosen = run_select(cfg, words, attn, seed=3)
  key = (np.arange(512)[:, None] * L + words)[words >= 0]
  size = np.bincount(key)
  hit = np.bincount(key, weights=chosen[words >= 0])
  assert np.all((hit == 0) | (hit == size))
  assert (hit == size)[size > 1].sum() > 1000  # multi-piece words do get chosen
  assert (chosen.sum(1) <= budget(attn.sum(1), cfg)).all()


def test_ngram_span_lengths_follow_one_over_n(long_seq):
  words, attn = long_seq
  total = 12  # a low rate on 512 tokens: spans rarely touch
  cfg = MaskingConfig(span="ngram", rate=total / 512, max_predictions=total)
  chosen = run_select(cfg, words, attn, seed=4)
  assert (chosen.sum(1) == total).all()
  runs = run_lengths(chosen)
  freq = np.bincount(runs, minlength=4)[1:4] / runs.size
  p = 1 / np.arange(1, 4)
  p /= p.sum()  # 6/11, 3/11, 2/11
  want = expected_run_freqs(p, total)[:3]
  np.testing.assert_allclose(freq, want, atol=0.02)
  # A uniform law over 1..3 would be far off: the test can tell them apart.
  assert np.abs(expected_run_freqs(np.ones(3) / 3, total)[:3] - freq).max() > 0.06
  assert np.mean(runs > 3) < 0.01  # only where two spans happen to touch


def test_geometric_span_lengths(long_seq):
  words, attn = long_seq
  p, max_span = 0.2, 10
  law = p * (1 - p) ** np.arange(max_span)
  law /= law.sum()
  mean_law = np.sum(np.arange(1, max_span + 1) * law)
  assert abs(mean_law - 3.8) < 0.05  # SpanBERT's mean span length
  total = 30
  cfg = MaskingConfig(span="geometric", rate=total / 512, max_predictions=total)
  chosen = run_select(cfg, words, attn, seed=5)
  runs = run_lengths(chosen)
  # The budget shortens the last span of each sequence: the expected mean run length is
  # that of the law under ALBERT's budget rule (3.53), below the law's own mean (3.8).
  want = expected_run_freqs(law, total)
  want_mean = np.sum(np.arange(1, total + 1) * want)
  assert abs(runs.mean() - want_mean) < 0.1, (runs.mean(), want_mean)
  np.testing.assert_allclose(np.bincount(runs, minlength=11)[1:11] / runs.size,
                             want[:10], atol=0.015)
  # Longer runs than max_span only where spans touch; an unclipped geometric law
  # (P(n > 10) = 0.107) would give several percent.
  assert np.mean(runs > max_span) < 0.005
  # Clipping by min(n, 10) instead of renormalising would move the mean well away.
  clipped = np.append(p * (1 - p) ** np.arange(max_span - 1), (1 - p) ** (max_span - 1))
  clipped_mean = np.sum(np.arange(1, total + 1) * expected_run_freqs(clipped, total))
  assert abs(runs.mean() - clipped_mean) > 0.25


@pytest.mark.parametrize("cfg", [
    MaskingConfig(span="geometric", rate=0.3, max_predictions=80),
    MaskingConfig(span="ngram", whole_word=True, rate=0.3, max_predictions=80),
], ids=["geometric", "ngram_ww"])
def test_spans_never_cross_a_non_candidate(cfg):
  # Candidates alternate with [SEP]-like tokens: every stretch is one word, so every span
  # is a single unit and the choice is uniform among the candidates. A span running over
  # a -1 would choose neighbouring candidates together far more often than chance.
  batch, length = 1024, 128
  pos = np.arange(length)
  words = np.where(pos % 2 == 1, pos // 2, -1).astype(np.int32)
  words = np.tile(words, (batch, 1))
  attn = np.ones((batch, length), np.int32)
  chosen = run_select(cfg, words, attn, seed=6)
  cand = chosen[:, 1::2]  # 64 candidates, budget round(128 * 0.3) = 38
  assert (cand.sum(1) == 38).all() and not chosen[:, 0::2].any()
  both = np.mean(cand[:, 1:] & cand[:, :-1])
  uniform = 38 * 37 / (64 * 63)  # 0.349
  assert abs(both - uniform) < 0.01, (both, uniform)


# ---------------------------------------------------------------- keys and config


def test_deterministic_from_keys(data, default_out):
  ids, words, attn = data
  again = run_mask(MaskingConfig(), *data)
  for k in default_out:
    np.testing.assert_array_equal(again[k], default_out[k])
  other = run_mask(MaskingConfig(), *data, seed=1)
  assert np.mean(np.any(other["mlm_mask"] != default_out["mlm_mask"], axis=1)) > 0.95
  # Raw uint32 key data gives the same as the typed keys it holds.
  keys = jax.random.split(jax.random.key(0), B)
  fn = _jitted_mask_batch(MaskingConfig(), MASK, FIRST_REGULAR, VOCAB)
  raw = fn(jax.random.key_data(keys), ids, words, attn)
  np.testing.assert_array_equal(np.asarray(raw["input_ids"]), default_out["input_ids"])


@pytest.mark.parametrize("kwargs,field", [
    (dict(rate=0.0), "rate"),
    (dict(rate=1.5), "rate"),
    (dict(max_predictions=0), "max_predictions"),
    (dict(max_predictions=2.5), "max_predictions"),
    (dict(mask_prob=-0.1), "mask_prob"),
    (dict(random_prob=1.1), "random_prob"),
    (dict(mask_prob=0.8, random_prob=0.3), "random_prob"),
    (dict(span="spanbert"), "span"),
    (dict(max_ngram=0), "max_ngram"),
    (dict(span_p=0.0), "span_p"),
    (dict(span_p=1.2), "span_p"),
    (dict(max_span=0), "max_span"),
])
def test_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    MaskingConfig(**kwargs)


def test_mask_batch_argument_errors(data):
  ids, words, attn = data
  keys = jax.random.split(jax.random.key(0), B)
  with pytest.raises(ValueError, match="first_regular_id"):
    mask_batch(keys, ids, words, attn, MaskingConfig(), mask_id=MASK,
               first_regular_id=VOCAB, vocab_size=VOCAB)
  with pytest.raises(ValueError, match="one key per example"):
    mask_batch(keys[:3], ids, words, attn, MaskingConfig(), mask_id=MASK,
               first_regular_id=FIRST_REGULAR, vocab_size=VOCAB)
