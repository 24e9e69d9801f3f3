"""Poolings of the encoder's states into one vector per sequence, for the pooled task heads.

Each is a function called inside `TaskHead`'s compact body, so the modules it creates sit
at params["task"][name]: "pooler" keeps BERT's layout (restored from pretraining's NSP/SOP
pooler, exported as transformers' pooler). The others are the Kaggle kits' usual set:
the raw [CLS] state, mean and max over the real tokens, a learned attention over the
tokens, the last k layers' [CLS] states concatenated, and a learned weighted mix of them
(WeightedLayerPooling: weights start at 1, sum(w_l h_l) / sum(w_l)).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from bert_jax import heads

NEEDS_LAYERS = ("concat", "weighted")  # read every layer's states


def _real(mask):
  return (mask > 0).astype(jnp.float32)[..., None]


def _layers(states, k: int):
  """The [CLS] states of the last k layers, last first (the final, normed output first)."""
  every = tuple(states["all_hidden_states"][:-1]) + (states["hidden_states"],)
  if not 1 <= k <= len(every) - 1:
    raise ValueError(f"head.pool_layers={k} must be in 1..{len(every) - 1} (the layers)")
  return [every[-i][:, 0].astype(jnp.float32) for i in range(1, k + 1)]


# Each: (the task head whose compact body is running, the encoder's outputs, the attention
# mask) -> [B, width]. Modules made here are the head's children; parameters the head's.


def pooler(head, states, mask):
  return heads.Pooler(head.cfg, name="pooler")(states["hidden_states"])


def cls(head, states, mask):
  return states["hidden_states"][:, 0]


def mean(head, states, mask):
  w = _real(mask)
  return jnp.sum(states["hidden_states"] * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)


def max_(head, states, mask):
  h = states["hidden_states"].astype(jnp.float32)
  return jnp.max(jnp.where(_real(mask) > 0, h, jnp.finfo(jnp.float32).min), 1)


def attention(head, states, mask):
  h = states["hidden_states"].astype(jnp.float32)
  scores = nn.Dense(1, name="attention")(h)[..., 0]
  scores = jnp.where(mask > 0, scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bl,blh->bh", nn.softmax(scores, -1), h)


def concat(head, states, mask):
  return jnp.concatenate(_layers(states, head.pool_layers), -1)


def weighted(head, states, mask):
  layers = jnp.stack(_layers(states, head.pool_layers), 0)  # [k, B, H]
  weights = head.param("layer_weights", nn.initializers.ones, (head.pool_layers,))
  return jnp.einsum("k,kbh->bh", weights, layers) / jnp.sum(weights)


POOLINGS: dict[str, Callable] = {"pooler": pooler, "cls": cls, "mean": mean, "max": max_,
                                 "attention": attention, "concat": concat,
                                 "weighted": weighted}


def check(name: str) -> None:
  if name not in POOLINGS:
    raise ValueError(f"head.pooling={name!r} is not one of {sorted(POOLINGS)}")
