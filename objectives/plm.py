"""Permutation language modelling (XLNet) with two-stream attention in the shared encoder.

Corruption (pure, jittable, one key per example folded with its `example_id`):
  * partial prediction: about 1/K of the tokens (K = `plm.partial_k`, 6 by default) become
    targets, chosen in spans of n <= `plm.max_span` (5) tokens with p(n) ∝ 1/n, never
    [CLS]/[SEP]/padding (`objectives.masking.select_positions`, "ngram" law; the budget is
    round(real tokens / K), capped at `plm.max_predictions` gathered slots);
  * a factorization order: every non-target token comes first (order -1: they see each
    other and are visible to every position), then the targets in a random order 0..T-1;
  * content mask: i sees j iff order(j) <= order(i) (itself included); query mask: iff
    order(j) < order(i) (never itself); padding is visible to no other position;
  * targets gathered into `plm.max_predictions` slots: plm_positions, plm_ids, plm_weights.
The input ids are not corrupted: the content stream reads the original tokens.

Model: the query stream starts at the target slots from a learned mask embedding (plus the
position's and segment's embeddings, through the embedding LayerNorm, on an absolute-
position encoder; XLNet's relative encoder adds nothing, its attention knows the position),
runs through every layer with the content stream's weights (`Encoder(query_states=...)`),
and is decoded with the tied output embedding: BERT's MLM head (transform + LayerNorm +
tied + bias) by default, XLNet's (tied + bias) with `plm.head_transform=False`.

Parameters: params["encoder"] and params["plm"] = {"mask_emb", "head" or "bias"}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import objectives
from bert_jax import heads
from bert_jax.encoder import DTYPES, EncoderConfig
from objectives.base import Objective, SpecialIds
from objectives.masking import MaskingConfig, select_positions
from objectives.mlm import masked_lm_loss


def plm_masks(order_L, target_L, attention_mask_L):
  """Content and query masks [L, L] (row i may see column j) from a factorization order.

  order_L: int [L], -1 for every non-target (context), 0..T-1 for the targets.
  """
  real = attention_mask_L > 0
  before_or_same = order_L[None, :] <= order_L[:, None]
  content = (before_or_same & real[None, :]) | jnp.eye(order_L.shape[0], dtype=bool)
  query = (order_L[None, :] < order_L[:, None]) & real[None, :]
  # A non-target's query row is never used; give it its content row so that no row of the
  # attention is empty (a fully masked softmax row is uniform, or NaN on some kernels).
  query = jnp.where(target_L[:, None], query, content)
  return content, query


def sample_permutation(key, input_ids, word_ids, attention_mask, masking: MaskingConfig):
  """One sequence's targets, factorization order, masks and prediction slots."""
  key_select, key_order = jax.random.split(key)
  chosen = select_positions(key_select, word_ids, attention_mask, masking)
  num = masking.max_predictions
  (positions,) = jnp.nonzero(chosen, size=num, fill_value=0)
  positions = positions.astype(jnp.int32)
  weights = jnp.arange(num) < jnp.sum(chosen)
  target = jnp.zeros_like(chosen).at[positions].max(weights)  # only what was gathered
  # Targets in a uniformly random order after every non-target.
  u = jax.random.uniform(key_order, chosen.shape)
  rank = jnp.argsort(jnp.argsort(jnp.where(target, u, 2.0)))
  order = jnp.where(target, rank, -1).astype(jnp.int32)
  content, query = plm_masks(order, target, attention_mask)
  return {
      "plm_positions": positions,
      "plm_ids": input_ids[positions].astype(jnp.int32),
      "plm_weights": weights.astype(jnp.float32),
      "plm_order": order,
      "plm_target": target,
      "plm_content_mask": content,
      # The query stream runs at the prediction slots only: [P, L].
      "plm_query_mask": query[positions],
  }


class PLMModule(nn.Module):
  """Two-stream forward pass and the tied output layer at the prediction slots."""

  cfg: EncoderConfig
  head_transform: bool = True

  @nn.compact
  def __call__(self, encoded, batch, encoder, *, deterministic: bool):
    del encoded
    cfg = self.cfg
    ids, padding = batch["input_ids"], batch["attention_mask"]
    seg = batch.get("segment_ids")
    seg = jnp.zeros_like(ids) if seg is None else seg
    positions = batch["plm_positions"]
    B, P = positions.shape
    mask_emb = self.param(
        "mask_emb", nn.with_logical_partitioning(
            nn.initializers.truncated_normal(cfg.initializer_range), ("embed",)),
        (cfg.embed_size,), DTYPES[cfg.param_dtype])
    vectors = jnp.broadcast_to(mask_emb.astype(DTYPES[cfg.dtype]), (B, P, cfg.embed_size))
    emb = encoder.embeddings
    position_ids = emb.position_ids(padding)
    gather = lambda x: jnp.take_along_axis(x, positions, axis=1)  # noqa: E731
    g = emb.project(emb.embed_vectors(vectors, gather(seg), gather(position_ids),
                                      deterministic=deterministic))
    out = encoder(ids, seg, batch["plm_content_mask"], position_ids=position_ids,
                  deterministic=deterministic, query_states=g,
                  query_mask=batch["plm_query_mask"], query_positions=positions)
    q = out["query_states"]
    if self.head_transform:
      return heads.MLMHead(cfg, name="head")(q, encoder)
    # XLNet's lm_loss: dropout, then the tied word embeddings plus a bias.
    if cfg.embed_size != cfg.hidden_size:
      raise ValueError("plm.head_transform=False decodes the hidden states with the word "
                       "embeddings: it needs embedding_size == hidden_size")
    q = nn.Dropout(cfg.hidden_dropout)(q, deterministic=deterministic)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("vocab",)),
                      (cfg.vocab_size,), DTYPES[cfg.param_dtype])
    return encoder.attend(q).astype(jnp.float32) + bias.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PLMConfig:
  """config.plm: XLNet's recipe (predict 1/6 of the tokens, spans of n <= 5, p(n) ~ 1/n)."""

  partial_k: float = 6
  max_predictions: int = 22  # presets: max(20, round(seq_len / 6 + 0.5))
  max_span: int = 5
  whole_word: bool = False
  head_transform: bool = True  # BERT's MLM head on the query stream; False: XLNet's

  def __post_init__(self):
    if not self.partial_k >= 1:
      raise ValueError(f"plm.partial_k must be >= 1 (predict 1/K of the tokens), got "
                       f"{self.partial_k}")


@objectives.register
@dataclasses.dataclass(frozen=True)
class PermutationLM(Objective):
  name = "plm"
  Config = PLMConfig

  masking: MaskingConfig
  special: SpecialIds
  head_transform: bool = True

  @classmethod
  def from_config(cls, config, special):
    c = cls.section(config)
    masking = MaskingConfig(rate=1.0 / c.partial_k, max_predictions=c.max_predictions,
                            mask_prob=0.0, random_prob=0.0, whole_word=c.whole_word,
                            span="ngram", max_ngram=c.max_span)
    return cls(masking=masking, special=special, head_transform=c.head_transform)

  runs_encoder = True  # two streams over the clean ids

  @classmethod
  def for_seq_len(cls, config, seq_len):
    c = config[cls.name]
    c.max_predictions = max(20, round(seq_len / c.partial_k + 0.5))

  def corrupt(self, clean, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(clean["example_id"])
    return jax.vmap(sample_permutation, in_axes=(0, 0, 0, 0, None))(
        keys, jnp.asarray(clean["input_ids"]), jnp.asarray(clean["word_ids"]),
        jnp.asarray(clean["attention_mask"]), self.masking)

  def head(self, encoder_config, name):
    return PLMModule(encoder_config, self.head_transform, name=name)

  def loss(self, outputs: Any, inputs):
    # The tokenizer's vocabulary: rows the table is padded by stay out of the softmax.
    return masked_lm_loss(outputs, inputs["plm_ids"], inputs["plm_weights"],
                          self.special.vocab_size)
