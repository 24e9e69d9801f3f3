"""PMI-Masking (Levine et al. 2021), `mlm.pmi=True`: masked LM whose masking units are
the corpus' collocations, found from n-gram counts when the examples are prepared.

Host side, once per dataset (the `Feature` "pmi_units" MLM's view declares), on the
training split's corpus:
  * words are the tokenizer's words (word-start pieces, as whole-word masking), and
    n-grams never cross a sentence;
  * every word n-gram of length 2..pmi_max_n (5) seen more than pmi_min_count (10) times
    is scored with the paper's PMI_n: log p(w1..wn) minus the largest sum of log p over the ways to
    cut the n-gram into two or more contiguous pieces (p of a k-gram: its count over the
    number of k-gram positions). Unlike the naive n-way PMI, an n-gram made of a strong
    collocation plus an unrelated word scores low;
  * the masking vocabulary takes the top of each length's ranking in the paper's shares
    (1/2 bigrams, 1/4 trigrams, 1/8 each 4- and 5-grams) of pmi_vocab_size n-grams (800K
    in the paper, for Wikipedia + BookCorpus, where about half of the tokens fell in one);
  * each sentence is cut into units left to right, a vocabulary n-gram where one starts
    (the longest), else one word; "pmi_units" gives every example position its unit's
    index, -1 for [CLS], [SEP] and padding.
Device side: MLM's masking with whole units (`MaskingConfig.whole_word` over those units
instead of words): units are drawn in random order until the 15% budget, then 80/10/10;
the head, the loss, fine-tuning, fill-mask and export are MLM's, and NSP, SOP or
distillation beside it read the same view. Chance: MLM's (about 1/vocabulary).

Departures: the paper's vocabulary ranks by PMI_n alone (its released lists multiply in
the n-gram's frequency); where vocabulary n-grams overlap, the paper does not say which
wins: here the leftmost, then the longest. The vocabulary is counted on the in-memory
training corpus of the run (launch.prepare_data does not build features yet).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np

from objectives.base import Feature

UNITS = "pmi_units"
SHARES = {2: 0.5, 3: 0.25, 4: 0.125, 5: 0.125}  # of the vocabulary, per n-gram length
_MIX = np.uint64(0x9E3779B97F4A7C15)


# ------------------------------------------------------------------ host side: the units


def _hash_rows(cols: list[np.ndarray]) -> np.ndarray:
  """A uint64 key per row of equal-length integer columns (collisions: ~n^2 / 2^64)."""
  h = np.zeros(cols[0].shape, np.uint64)
  with np.errstate(over="ignore"):
    for c in cols:
      h = (h ^ c.astype(np.uint64)) * _MIX + np.uint64(0x632BE59BD9B4E019)
      h ^= h >> np.uint64(29)
  return h


def corpus_words(corpus) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(word id of each word, sentence of each word, first token of each word): words are
  runs from one word start to the next; equal token sequences get equal ids."""
  starts = corpus.word_start.copy()
  starts[corpus.sent_offsets[:-1]] = True
  first = np.flatnonzero(starts)
  word_of_token = np.cumsum(starts) - 1
  pos = np.arange(len(corpus.ids)) - first[word_of_token]
  with np.errstate(over="ignore"):  # a polynomial hash of the word's pieces
    mult = np.power(_MIX, pos.astype(np.uint64))
    terms = (corpus.ids.astype(np.uint64) + np.uint64(1)) * mult
  keys = np.add.reduceat(terms, first)
  _, word_ids = np.unique(keys, return_inverse=True)
  sentence = np.searchsorted(corpus.sent_offsets, first, side="right") - 1
  return word_ids.astype(np.int64), sentence, first


@dataclasses.dataclass
class Words:
  """A corpus cut into words once (`corpus_words`), with its n-gram keys by n as asked:
  the vocabulary and the units of the training split share one parse."""

  words: np.ndarray
  sentence: np.ndarray
  first: np.ndarray
  _keys: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def of(cls, corpus) -> "Words":
    return cls(*corpus_words(corpus))

  def ngrams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n not in self._keys:
      self._keys[n] = ngram_keys(self.words, self.sentence, n)
    return self._keys[n]


def ngram_keys(words: np.ndarray, sentence: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(key, valid) for the n-gram starting at each word: valid where it stays inside one
  sentence."""
  m = len(words)
  valid = np.zeros(m, bool)
  keys = np.zeros(m, np.uint64)
  if m >= n:
    cols = [words[i:m - n + 1 + i] for i in range(n)]
    keys[:m - n + 1] = _hash_rows(cols)
    valid[:m - n + 1] = sentence[:m - n + 1] == sentence[n - 1:]
  return keys, valid


def pmi_n(log_p: dict[tuple[int, int], np.ndarray], n: int) -> np.ndarray:
  """The paper's PMI_n for many n-grams at once: log_p[(a, b)] is log p of words a..b-1
  of each n-gram. PMI_n = log p(all) - max over cuts into >= 2 pieces of sum log p."""
  best = {}  # best[(a, b)]: the best sum over cuts of a..b into >= 1 pieces
  for length in range(1, n + 1):
    for a in range(0, n - length + 1):
      b = a + length
      v = log_p[(a, b)] if length < n else np.full_like(log_p[(0, n)], -np.inf)
      for m in range(a + 1, b):
        v = np.maximum(v, best[(a, m)] + best[(m, b)])
      best[(a, b)] = v
  return log_p[(0, n)] - best[(0, n)]


def masking_vocabulary(corpus, max_n: int, min_count: int, vocab_size: int,
                       words: Words | None = None) -> dict[int, np.ndarray]:
  """{n: sorted keys of the length-n n-grams in the masking vocabulary}; `words`: the
  corpus already parsed."""
  words = words or Words.of(corpus)
  counts: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}  # n: (keys, counts, total)
  starts: dict[int, np.ndarray] = {}
  keys_at: dict[int, np.ndarray] = {}  # n: the key of the n-gram starting at each word
  for n in range(1, max_n + 1):
    keys, valid = words.ngrams(n)
    keys_at[n] = keys
    u, first, c = np.unique(keys[valid], return_index=True, return_counts=True)
    counts[n] = (u, c, float(valid.sum()))
    starts[n] = np.flatnonzero(valid)[first]

  def log_p(k, keys):
    u, c, total = counts[k]
    i = np.searchsorted(u, keys).clip(0, len(u) - 1)
    found = u[i] == keys  # always true for pieces of a counted n-gram
    return np.where(found, np.log(np.maximum(c[i], 1)) - np.log(total), -np.inf)

  vocab = {}
  for n in range(2, max_n + 1):
    u, c, _ = counts[n]
    keep = c > min_count
    at = starts[n][keep]
    pieces = {(a, b): log_p(b - a, keys_at[b - a][at + a])
              for a, b in itertools.combinations(range(n + 1), 2)}
    score = pmi_n(pieces, n)
    quota = int(vocab_size * SHARES[n])
    top = np.argsort(-score, kind="stable")[:quota]
    vocab[n] = np.sort(u[keep][top])
  return vocab


def vocabulary_ngrams(corpus, vocab: dict[int, np.ndarray]) -> dict[int, set[tuple]]:
  """The vocabulary read back from the corpus: {n: {(word, ..., word)}}, each word a
  tuple of token ids (to inspect it, or decode it with the tokenizer)."""
  words, sentence, first = corpus_words(corpus)
  ends = np.append(first[1:], len(corpus.ids))
  out = {}
  for n, keys_n in vocab.items():
    keys, valid = ngram_keys(words, sentence, n)
    hit = np.flatnonzero(valid & np.isin(keys, keys_n))
    _, once = np.unique(keys[hit], return_index=True)
    out[n] = {tuple(tuple(corpus.ids[first[i + k]:ends[i + k]].tolist()) for k in range(n))
              for i in hit[once]}
  return out


def unit_starts(corpus, vocab: dict[int, np.ndarray],
                words: Words | None = None) -> tuple[np.ndarray, float]:
  """(bool [T]: where a masking unit starts (a vocabulary n-gram, longest first, else a
  word), cutting each sentence left to right; the fraction of words inside a
  collocation). `words`: the corpus already parsed."""
  words = words or Words.of(corpus)
  first = words.first
  m = len(words.words)
  match = np.zeros(m, np.int64)  # the longest vocabulary n-gram starting at each word
  for n in sorted(vocab):
    keys, valid = words.ngrams(n)
    hit = valid & np.isin(keys, vocab[n])
    match[hit] = n
  word_starts = np.ones(m, bool)
  i = 0
  hits = np.flatnonzero(match)
  for i0 in hits:  # greedy left to right: a match inside an earlier unit is skipped
    if i0 < i:
      continue
    word_starts[i0 + 1:i0 + match[i0]] = False
    i = i0 + match[i0]
  out = np.zeros(len(corpus.ids), bool)
  out[first[word_starts]] = True
  sizes = np.diff(np.append(np.flatnonzero(word_starts), m))
  return out, float(sizes[sizes > 1].sum()) / max(m, 1)


@dataclasses.dataclass(frozen=True)
class PrepareUnits:
  """Feature.prepare of "pmi_units" (a value: equal configs give equal features)."""

  max_n: int
  min_count: int
  vocab_size: int

  def __call__(self, context):
    stats = context.statistics_corpus()
    words = Words.of(stats)
    vocab = masking_vocabulary(stats, self.max_n, self.min_count, self.vocab_size, words)
    # The training split is parsed once for both; another split has words of its own.
    starts, covered = unit_starts(context.corpus, vocab,
                                  words if context.corpus is stats else None)
    units = (np.cumsum(starts) - 1).astype(np.int32)
    logging.info("pmi: %s n-grams in the masking vocabulary (%s); %.1f%% of the words "
                 "are in one", f"{sum(len(v) for v in vocab.values()):,}",
                 ", ".join(f"{n}-grams {len(v):,}" for n, v in vocab.items()), 100 * covered)

    def make(example, offsets):
      return np.where(offsets >= 0, units[offsets.clip(0)], -1)
    return make


def units_feature(max_n: int, min_count: int, vocab_size: int) -> Feature:
  """The host-side field MLM's view reads with `mlm.pmi`."""
  if not 1 <= max_n <= max(SHARES):
    raise ValueError(f"mlm.pmi_max_n={max_n}: one of 1..{max(SHARES)}")
  if min_count < 0 or vocab_size < 0:
    raise ValueError(f"mlm.pmi_min_count={min_count}, mlm.pmi_vocab_size={vocab_size}: "
                     "both must be >= 0")
  return Feature(UNITS, PrepareUnits(max_n, min_count, vocab_size), fill=-1)
