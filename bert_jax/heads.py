"""Heads on top of the shared encoder's outputs.

Objectives and fine-tuning tasks compose these; none of them knows which encoder family
produced the hidden states. Parameter names follow the roles in BERT's heads so that the
Hugging Face mapping in `bert_jax.hf` stays one table.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bert_jax.encoder import ACTIVATIONS, DTYPES, Encoder, EncoderConfig, LayerNorm

Array = jax.Array


def _kernel(cfg: EncoderConfig, axes):
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(cfg.initializer_range), axes)


def _bias(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def gather_positions(x_BxLxH: Array, positions_BxP: Array) -> Array:
  """x[b, positions[b, p]] -> [B, P, H]; predicting only masked positions saves the
  vocabulary projection for the ~85% of tokens that have no target."""
  return jnp.take_along_axis(x_BxLxH, positions_BxP[..., None], axis=1)


class MLMHead(nn.Module):
  """dense -> activation -> LayerNorm -> tied word embeddings + bias (BERT's cls.predictions).

  The transform maps to the embedding width, so factorized encoders (ALBERT, ELECTRA's
  generator) decode through their own (smaller) embedding table. MobileBERT's
  (`project_word_embeddings`) stays at hidden width and decodes with an output matrix of
  hidden_size rows: the word embeddings' embed_size, then `extra_output`'s.
  """

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, hidden: Array, encoder: Encoder) -> Array:
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    width = cfg.hidden_size if cfg.project_word_embeddings else cfg.embed_size
    h = nn.Dense(width, dtype=dtype, param_dtype=pdtype,
                 kernel_init=_kernel(cfg, ("embed", "embed_proj")),
                 bias_init=_bias(("embed_proj",)), name="transform")(hidden)
    h = ACTIVATIONS[cfg.head_act or cfg.hidden_act](h)
    h = LayerNorm(cfg.layer_norm_eps, axis_name="embed_proj", dtype=dtype,
                  name="transform_norm")(h)
    e = cfg.embed_size
    logits = encoder.attend(h[..., :e])
    if width > e:
      extra = self.param("extra_output", _kernel(cfg, ("embed_proj", "vocab")),
                         (width - e, cfg.vocab_size), pdtype)
      logits = logits + h[..., e:] @ extra.astype(dtype)
    bias = self.param("bias", _bias(("vocab",)), (cfg.vocab_size,), pdtype)
    # Logits in fp32: the softmax over a large vocabulary is where bf16 loses most.
    return logits.astype(jnp.float32) + bias.astype(jnp.float32)


class Pooler(nn.Module):
  """dense + tanh on the first ([CLS]) token, BERT's pooled output (MobileBERT with
  pooler_activation=False: the first token's hidden state as it is)."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.cfg
    if not cfg.pooler_activation:
      return hidden[:, 0]
    x = nn.Dense(cfg.hidden_size, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
                 kernel_init=_kernel(cfg, ("embed", None)), bias_init=_bias((None,)),
                 name="dense")(hidden[:, 0])
    return jnp.tanh(x)


class Classifier(nn.Module):
  """dropout -> dense(num_outputs); the last layer of every task and pair head."""

  cfg: EncoderConfig
  num_outputs: int
  dropout: float | None = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    cfg = self.cfg
    rate = cfg.hidden_dropout if self.dropout is None else self.dropout
    x = nn.Dropout(rate)(x, deterministic=deterministic)
    out = nn.Dense(self.num_outputs, dtype=DTYPES[cfg.dtype],
                   param_dtype=DTYPES[cfg.param_dtype],
                   kernel_init=_kernel(cfg, ("embed", None)), bias_init=_bias((None,)),
                   name="dense")(x)
    return out.astype(jnp.float32)


class PairHead(nn.Module):
  """Pooler + two-way classifier on [CLS]: BERT's NSP head, ALBERT's SOP head."""

  cfg: EncoderConfig
  num_outputs: int = 2
  return_pooled: bool = False  # also return the pooled [CLS] output: (logits, pooled)

  @nn.compact
  def __call__(self, hidden: Array, *, deterministic: bool = True):
    pooled = Pooler(self.cfg, name="pooler")(hidden)
    # BERT's pretraining heads apply no dropout after the pooler.
    logits = Classifier(self.cfg, self.num_outputs, dropout=0.0, name="classifier")(
        pooled, deterministic=deterministic)
    return (logits, pooled) if self.return_pooled else logits


class DiscriminatorHead(nn.Module):
  """ELECTRA's replaced-token-detection head: dense(H) -> activation -> dense(1).

  Returns one logit per token, [B, L] in fp32 (1 = replaced). Parameter names "dense" and
  "prediction" are Hugging Face's discriminator_predictions.dense / .dense_prediction.
  """

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, hidden: Array) -> Array:
    cfg = self.cfg
    dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    h = nn.Dense(cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                 kernel_init=_kernel(cfg, ("embed", "mlp")), bias_init=_bias(("mlp",)),
                 name="dense")(hidden)
    h = ACTIVATIONS[cfg.hidden_act](h)
    out = nn.Dense(1, dtype=dtype, param_dtype=pdtype, kernel_init=_kernel(cfg, ("mlp", None)),
                   bias_init=_bias((None,)), name="prediction")(h)
    return out[..., 0].astype(jnp.float32)


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example CE in fp32 for integer labels."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return logz - picked


def metric(total: Any, count: Any) -> tuple[Array, Array]:
  """A metric as (sum, count), so that it averages correctly across steps and devices."""
  return jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)
