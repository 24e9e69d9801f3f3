"""Masked-LM position selection and corruption (BERT / ALBERT n-grams / SpanBERT spans).

Pure and jittable: every function here is jax.numpy on device arrays; the only host-side
work is on static shapes and config values (the budget table, the span-length law).

Selection follows ALBERT's ``create_masked_lm_predictions`` (which reduces to BERT's when
spans are off): the budget of a sequence of ``n`` real tokens is
``min(max_predictions, max(1, round(n * rate)))``; candidate span starts are visited in a
random order; for each, a span length (in units: tokens, or words with ``whole_word``) is
sampled, shortened until its tokens fit in what is left of the budget, and skipped if it
still does not fit or touches an already chosen token.

Choices made where the references are silent or differ:
  * A span never crosses a non-candidate token ([CLS], [SEP], padding): spans are runs of
    consecutive units inside one stretch of candidates. Near the end of a stretch, by
    default, the length is sampled from the law restricted to the units available there
    (renormalised). ALBERT does not renormalise: it samples n from the full law and its
    n-gram lists near the end of the sequence are shorter, so the span is truncated to
    what is left (the lengths that do not fit give their mass to the longest that does);
    ``truncate_spans=True`` does that (the albert preset sets it).
  * Whole-word units are the tokenizer's words: a piece starting with the word-boundary
    marker (and each sentence's first token) starts a word, so a punctuation piece such as
    "," that follows a word without a space belongs to that word. ALBERT's
    ``_is_start_piece_sp`` also makes every single-punctuation piece (and "<...>" pieces)
    a start of its own: there "word," is two units, here one.
  * "geometric" is SpanBERT's law: p(n) ∝ span_p * (1 - span_p)^(n - 1) for n <= max_span,
    renormalised (mean 3.8 for p=0.2, max 10), not min(Geometric, max_span).
  * ``round`` is Python's (half to even), evaluated on the host for every possible length,
    so the budget is exactly the one of BERT's create_pretraining_data.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_SPANS = ("none", "ngram", "geometric")
REPLACEMENTS = ("mask", "unk")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """How many positions to predict, how to choose them, how to corrupt them."""

  rate: float = 0.15  # fraction of the sequence's tokens to predict
  max_predictions: int = 20  # P: positions gathered per sequence (padded with weight 0)
  mask_prob: float = 0.8  # of chosen positions: replaced by [MASK]
  random_prob: float = 0.1  # of chosen positions: a random regular token; the rest are kept
  whole_word: bool = False  # units are words (all pieces chosen together) instead of tokens
  span: str = "none"  # "none" | "ngram" (ALBERT) | "geometric" (SpanBERT)
  max_ngram: int = 3
  span_p: float = 0.2
  max_span: int = 10
  truncate_spans: bool = False  # ALBERT: truncate near a stretch's end, not renormalise
  replace_with: str = "mask"  # "mask": [MASK] | "unk": [UNK] (the masked branch's token)
  # DistilBERT's mlm_smoothing: token i is drawn with weight count_i^-smoothing (0: uniform);
  # the positions are a weighted draw without replacement (Gumbel top-k) of the budget.
  smoothing: float = 0.0

  def __post_init__(self):
    def check(ok, field, msg):
      if not ok:
        raise ValueError(
            f"MaskingConfig.{field}={getattr(self, field)!r}: {msg}")

    check(isinstance(self.rate, (int, float)) and 0.0 < self.rate <= 1.0,
          "rate", "must be in (0, 1]")
    check(_is_int(self.max_predictions) and self.max_predictions >= 1,
          "max_predictions", "must be an integer >= 1")
    check(isinstance(self.mask_prob, (int, float)) and 0.0 <= self.mask_prob <= 1.0,
          "mask_prob", "must be in [0, 1]")
    check(isinstance(self.random_prob, (int, float)) and 0.0 <= self.random_prob <= 1.0,
          "random_prob", "must be in [0, 1]")
    check(self.mask_prob + self.random_prob <= 1.0 + 1e-9, "random_prob",
          f"mask_prob + random_prob = {self.mask_prob + self.random_prob} must be <= 1")
    check(isinstance(self.whole_word, (bool, np.bool_)), "whole_word", "must be a bool")
    check(self.span in _SPANS, "span", f"must be one of {_SPANS}")
    check(_is_int(self.max_ngram) and self.max_ngram >= 1,
          "max_ngram", "must be an integer >= 1")
    check(isinstance(self.span_p, (int, float)) and 0.0 < self.span_p <= 1.0,
          "span_p", "must be in (0, 1]")
    check(_is_int(self.max_span) and self.max_span >= 1,
          "max_span", "must be an integer >= 1")
    check(self.replace_with in REPLACEMENTS, "replace_with", f"must be one of {REPLACEMENTS}")
    check(isinstance(self.smoothing, (int, float)) and self.smoothing >= 0, "smoothing",
          "must be >= 0")
    check(self.smoothing == 0 or (self.span == "none" and not self.whole_word), "smoothing",
          "weights single tokens: it needs span='none' and whole_word=False")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _span_length_probs(cfg: MaskingConfig) -> np.ndarray:
  """p(n) for n = 1..K (K = the longest span) of the configured span law, float64 [K]."""
  if cfg.span == "none":
    p = np.ones(1)
  elif cfg.span == "ngram":
    p = 1.0 / np.arange(1, cfg.max_ngram + 1)
  else:
    p = cfg.span_p * (1.0 - cfg.span_p) ** np.arange(cfg.max_span)
  return p / p.sum()


def _budget_table(length: int, cfg: MaskingConfig) -> np.ndarray:
  """budget[n] for n = 0..length real tokens, with Python's round as in BERT."""
  return np.array(
      [min(cfg.max_predictions, max(1, int(round(n * cfg.rate))))
       for n in range(length + 1)], dtype=np.int32)


def _smoothed_choice(key, cand, budget, token_counts, smoothing: float) -> jax.Array:
  """`budget` candidates drawn without replacement with weights count^-smoothing:
  the top `budget` of log w + Gumbel noise (DistilBERT's mlm_smoothing)."""
  counts = jnp.maximum(jnp.asarray(token_counts).astype(jnp.float32), 1.0)
  score = jnp.where(cand, -smoothing * jnp.log(counts) + jax.random.gumbel(key, cand.shape),
                    -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-score))
  return cand & (rank < budget)


def select_positions(key, word_ids, attention_mask, cfg: MaskingConfig,
                     token_counts=None) -> jax.Array:
  """Chooses the positions to predict in ONE sequence; returns bool [L].

  Args:
    key: a PRNG key (typed or raw).
    word_ids: int [L], index of the word each token belongs to (ascending), -1 for tokens
      that may never be chosen ([CLS], [SEP], [PAD]).
    attention_mask: int or bool [L], 1 for real tokens.
    cfg: the masking config.
    token_counts: int [L], the corpus count of each token (needed with cfg.smoothing).
  """
  word_ids = jnp.asarray(word_ids).astype(jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  if word_ids.ndim != 1 or attention_mask.shape != word_ids.shape:
    raise ValueError(
        f"select_positions works on one sequence: word_ids {word_ids.shape} and "
        f"attention_mask {attention_mask.shape} must both be [L]")
  (length,) = word_ids.shape
  real = attention_mask > 0
  cand = real & (word_ids >= 0)

  prev_cand = jnp.concatenate([jnp.zeros((1,), bool), cand[:-1]])
  if cfg.whole_word:
    prev_word = jnp.concatenate([jnp.full((1,), -1, jnp.int32), word_ids[:-1]])
    unit_start = cand & (~prev_cand | (word_ids != prev_word))
  else:
    unit_start = cand
  # Stretches of consecutive candidates: a span never leaves its stretch.
  stretch = jnp.where(cand, jnp.cumsum(cand & ~prev_cand) - 1, -1)
  unit_idx = jnp.cumsum(unit_start) - 1  # global index of each token's unit

  budget = jnp.asarray(_budget_table(length, cfg))[jnp.sum(real)]
  if cfg.smoothing > 0:
    if token_counts is None:
      raise ValueError("MaskingConfig.smoothing > 0 needs the tokens' corpus counts")
    return _smoothed_choice(key, cand, budget, token_counts, cfg.smoothing)

  probs = jnp.asarray(_span_length_probs(cfg), jnp.float32)  # [K]
  span_len = jnp.arange(1, probs.shape[0] + 1)  # [K]

  key_order, key_len = jax.random.split(key)
  order = jax.random.permutation(key_order, length)
  uniforms = jax.random.uniform(key_len, (length,))

  def visit(carry, x):
    chosen, count = carry
    start, u = x
    # Tokens of the units at and after `start` in its stretch, and their unit offset.
    offset = unit_idx - unit_idx[start]
    region = (stretch == stretch[start]) & cand & (offset >= 0)
    available = jnp.max(jnp.where(region, offset, -1)) + 1  # units left in the stretch
    # n ~ p(n) restricted to n <= available (inverse CDF).
    cdf = jnp.cumsum(probs if cfg.truncate_spans else
                     jnp.where(span_len <= available, probs, 0.0))
    n = 1 + jnp.sum(cdf < u * cdf[-1])
    n = jnp.clip(n, 1, jnp.maximum(available, 1))
    # Tokens covered by spans of 1..K units; keep the longest <= n that fits the budget.
    tokens = jnp.sum(region[None, :] & (offset[None, :] < span_len[:, None]), axis=1)
    fits = (tokens <= budget - count) & (span_len <= n)
    n_fit = jnp.sum(fits)  # `tokens` grows with the length, so `fits` is a prefix
    span = region & (offset < n_fit)
    take = unit_start[start] & (n_fit > 0) & ~jnp.any(span & chosen)
    span = span & take
    return (chosen | span, count + jnp.sum(span)), None

  init = (jnp.zeros((length,), bool), jnp.zeros((), jnp.int32))
  (chosen, _), _ = jax.lax.scan(visit, init, (order, uniforms))
  return chosen


def _as_typed_keys(keys) -> jax.Array:
  keys = jnp.asarray(keys) if not isinstance(keys, jax.Array) else keys
  if jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return keys
  if keys.dtype != jnp.uint32:
    raise ValueError(f"keys must be typed PRNG keys or raw uint32 key data, got {keys.dtype}")
  return jax.random.wrap_key_data(keys)


def mask_batch(keys, input_ids, word_ids, attention_mask, cfg: MaskingConfig, *,
               mask_id: int, first_regular_id: int, vocab_size: int,
               token_counts=None) -> dict:
  """Chooses and corrupts the MLM positions of a batch, one key per example.

  Args:
    keys: [B] typed PRNG keys, or raw uint32 key data [B, 2].
    input_ids: int [B, L].
    word_ids: int [B, L], see select_positions.
    attention_mask: int or bool [B, L].
    cfg: the masking config.
    mask_id: id of [MASK] (the caller passes [UNK]'s for ``replace_with="unk"``).
    first_regular_id: random replacements are drawn from [first_regular_id, vocab_size).
    vocab_size: size of the vocabulary.
    token_counts: int [B, L], each token's corpus count (cfg.smoothing > 0).

  Returns:
    input_ids: int32 [B, L] corrupted ids.
    mlm_positions: int32 [B, P] chosen positions, ascending, padded with 0.
    mlm_ids: int32 [B, P] original ids at mlm_positions.
    mlm_weights: float32 [B, P] 1.0 for real predictions, 0.0 for padding slots.
    mlm_mask: bool [B, L] the predicted positions (agrees with mlm_positions/weights).
  """
  if cfg.random_prob > 0 and not 0 <= first_regular_id < vocab_size:
    raise ValueError(f"first_regular_id={first_regular_id} must be in [0, vocab_size="
                     f"{vocab_size}) to draw random replacements")
  if not 0 <= mask_id < vocab_size:
    raise ValueError(f"mask_id={mask_id} must be in [0, vocab_size={vocab_size})")
  keys = _as_typed_keys(keys)
  input_ids = jnp.asarray(input_ids).astype(jnp.int32)
  word_ids = jnp.asarray(word_ids)
  attention_mask = jnp.asarray(attention_mask)
  if input_ids.ndim != 2 or word_ids.shape != input_ids.shape or (
      attention_mask.shape != input_ids.shape):
    raise ValueError(f"input_ids {input_ids.shape}, word_ids {word_ids.shape} and "
                     f"attention_mask {attention_mask.shape} must all be [B, L]")
  if keys.shape != input_ids.shape[:1]:
    raise ValueError(f"need one key per example: keys {keys.shape} vs batch "
                     f"{input_ids.shape[0]}")

  num_predictions = cfg.max_predictions

  def one(key, ids, words, attn, *count):  # count: the tokens' counts, with smoothing
    key_select, key_branch, key_random = jax.random.split(key, 3)
    chosen = select_positions(key_select, words, attn, cfg, *count)
    (positions,) = jnp.nonzero(chosen, size=num_predictions, fill_value=0)
    positions = positions.astype(jnp.int32)
    weights = jnp.arange(num_predictions) < jnp.sum(chosen)
    # Only what was gathered is predicted, hence corrupted.
    mlm_mask = jnp.zeros_like(chosen).at[positions].max(weights)
    u = jax.random.uniform(key_branch, ids.shape)
    corrupted = jnp.where(mlm_mask & (u < cfg.mask_prob), mask_id, ids)
    if cfg.random_prob > 0:
      random_ids = jax.random.randint(key_random, ids.shape, first_regular_id, vocab_size,
                                      dtype=jnp.int32)
      is_random = mlm_mask & (u >= cfg.mask_prob) & (u < cfg.mask_prob + cfg.random_prob)
      corrupted = jnp.where(is_random, random_ids, corrupted)
    return {
        "input_ids": corrupted.astype(jnp.int32),
        "mlm_positions": positions,
        "mlm_ids": ids[positions],
        "mlm_weights": weights.astype(jnp.float32),
        "mlm_mask": mlm_mask,
    }

  extra = () if token_counts is None else (jnp.asarray(token_counts),)
  return jax.vmap(one)(keys, input_ids, word_ids, attention_mask, *extra)
