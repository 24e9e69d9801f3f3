"""Structured pruning of an encoder: attention heads by importance, whole layers.

Heads (Michel, Levy and Neubig 2019, "Are Sixteen Heads Really Better than One?"): a gate
xi_h multiplies the output of head h (the encoder's "head_gates" collection, see
`bert_jax.encoder.SelfAttention`); the importance of h is E_x |dL(x)/d xi_h| at xi = 1,
averaged over examples, then normalised per layer by the layer's l2 norm, as in the
paper's code. The least important heads over all layers are removed (each layer keeps
one at least). Removal is physical: the kept heads' slices of the query/key/value
kernels and biases and of the output kernel (and XLNet's per-head biases) stay, and
`EncoderConfig.pruned_heads` records per layer the original indices removed, so the
model is really smaller.

Layers (Sajjad et al. 2020, "On the Effect of Dropping Layers of Pre-trained Transformer
Models"): top, bottom or alternate (from the top: L-1, L-3, ...) dropping, or explicit
indices; the kept layers are renumbered 0..L'-1.

Everything here works on host numpy trees: params {"encoder": {...}, ...} -> same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bert_jax.encoder import EncoderConfig

# Attention parameters with a heads axis: name -> (leaf -> axis of the heads).
_HEAD_AXES = {
    ("query", "kernel"): 1, ("key", "kernel"): 1, ("value", "kernel"): 1,
    ("relative", "kernel"): 1,
    ("query", "bias"): 0, ("key", "bias"): 0, ("value", "bias"): 0,
    ("output", "kernel"): 0,
    ("r_w_bias",): 0, ("r_r_bias",): 0, ("r_s_bias",): 0, ("seg_embed",): 1,
}
LAYER_STRATEGIES = ("top", "bottom", "alternate")


def kept_heads(cfg: EncoderConfig, layer: int) -> list[int]:
  """Original indices of the heads layer `layer` still has, in the order they are stored."""
  gone = set(cfg.pruned_heads[layer]) if cfg.pruned_heads else set()
  return [h for h in range(cfg.num_heads) if h not in gone]


# ----------------------------------------------------------------------------- gates


def ones_gates(cfg: EncoderConfig, batch_size: int | None = None) -> dict[str, Any]:
  """The "head_gates" collection with every gate at 1: [heads] per layer, or [B, heads]
  (one gate per example, for per-example gradients)."""
  lead = () if batch_size is None else (batch_size,)
  return {"encoder": {f"layer_{i}": {"attention": {
      "gate": jnp.ones(lead + (cfg.layer_heads(i),), jnp.float32)}}
      for i in range(cfg.num_layers)}}


def mask_gates(cfg: EncoderConfig, masked: dict[int, Iterable[int]]) -> dict[str, Any]:
  """Gates at 0 for the heads `masked` names (original indices, per layer), 1 elsewhere."""
  gates = ones_gates(cfg)
  for layer, heads in masked.items():
    pos = [kept_heads(cfg, layer).index(h) for h in heads]
    g = gates["encoder"][f"layer_{layer}"]["attention"]["gate"]
    gates["encoder"][f"layer_{layer}"]["attention"]["gate"] = g.at[jnp.asarray(pos)].set(0.0)
  return gates


def head_importance(cfg: EncoderConfig, loss_fn: Callable, params: Any,
                    batches: Iterable[dict[str, np.ndarray]], *, normalize: bool = True
                    ) -> list[np.ndarray]:
  """Michel et al.'s importance of every head: per layer an array over its (kept) heads.

  `loss_fn(params, gates, batch) -> (scalar loss, per-example weights [B])` runs the model
  with the "head_gates" collection `gates` ([B, heads] per layer) and returns the weighted
  mean loss over the batch (as the fine-tuning tasks do). Per example, |dL_b/dxi_h| is
  recovered from the gradient of that mean (times the total weight), summed over the
  batches and divided by the examples seen; `normalize` divides each layer by its l2 norm.
  """

  @jax.jit
  def grads(gates, batch):
    def f(g):
      loss, w = loss_fn(params, g, batch)
      return loss, w
    g, w = jax.grad(f, has_aux=True)(gates)
    total = jnp.sum(w)
    return jax.tree.map(lambda x: jnp.sum(jnp.abs(x) * total, axis=0), g), total

  acc, seen = None, 0.0
  for batch in batches:
    n = len(batch["example_weight"])
    g, total = grads(ones_gates(cfg, n), batch)
    acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
    seen += float(total)
  if acc is None or seen == 0:
    raise ValueError("head importance needs at least one batch with examples")
  out = []
  for i in range(cfg.num_layers):
    imp = np.asarray(acc["encoder"][f"layer_{i}"]["attention"]["gate"], np.float64) / seen
    if normalize:
      imp = imp / (np.sqrt(np.sum(imp ** 2)) + 1e-20)
    out.append(imp)
  return out


def heads_to_prune(cfg: EncoderConfig, importance: list[np.ndarray], fraction: float
                   ) -> dict[int, list[int]]:
  """The least important `fraction` of all heads (of the original num_layers x num_heads,
  counting those already gone), lowest importance first over every layer; a layer keeps
  one head at least. Returns {layer: original head indices to remove}."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"head fraction {fraction} must be in [0, 1)")
  total = cfg.num_layers * cfg.num_heads
  already = total - sum(cfg.layer_heads(i) for i in range(cfg.num_layers))
  want = int(round(fraction * total)) - already
  order = sorted((float(v), i, h) for i, imp in enumerate(importance)
                 for v, h in zip(imp, kept_heads(cfg, i)))
  left = {i: cfg.layer_heads(i) for i in range(cfg.num_layers)}
  chosen: dict[int, list[int]] = {}
  for _, i, h in order:
    if want <= 0:
      break
    if left[i] > 1:
      chosen.setdefault(i, []).append(h)
      left[i] -= 1
      want -= 1
  return chosen


# ----------------------------------------------------------------------------- surgery


def prune_heads(cfg: EncoderConfig, params: Any, remove: dict[int, Iterable[int]]
                ) -> tuple[EncoderConfig, Any]:
  """(cfg, params) with the heads `remove` names (original indices per layer) cut out."""
  if cfg.num_layer_groups is not None:
    raise ValueError("cannot prune heads of layers shared across depth (num_layer_groups)")
  remove = {int(k): sorted(set(int(h) for h in v)) for k, v in remove.items()}
  bad = [k for k in remove if not 0 <= k < cfg.num_layers]
  if bad:
    raise ValueError(f"layers {bad} are not in 0..{cfg.num_layers - 1}")
  params = dict(params)
  encoder = dict(params["encoder"])
  pruned = []
  for i in range(cfg.num_layers):
    kept = kept_heads(cfg, i)
    gone = remove.get(i, [])
    missing = [h for h in gone if h not in kept]
    if missing:
      raise ValueError(f"layer {i} has no head(s) {missing} (it has {kept})")
    pos = np.asarray([p for p, h in enumerate(kept) if h not in gone])
    if len(pos) == 0:
      raise ValueError(f"pruning would remove every head of layer {i}")
    if gone:
      layer = dict(encoder[f"layer_{i}"])
      attention = _slice_heads(layer["attention"], pos)
      layer["attention"] = attention
      encoder[f"layer_{i}"] = layer
    pruned.append(tuple(h for h in range(cfg.num_heads) if h not in
                        {kept[p] for p in pos}))
  params["encoder"] = encoder
  new_cfg = dataclasses.replace(cfg, pruned_heads=tuple(pruned) if any(pruned) else None)
  return new_cfg, params


def _slice_heads(attention: dict[str, Any], pos: np.ndarray) -> dict[str, Any]:
  out = {}
  for name, sub in attention.items():
    if isinstance(sub, dict) or hasattr(sub, "items"):
      out[name] = {leaf: (np.take(np.asarray(v), pos, axis=_HEAD_AXES[(name, leaf)])
                          if (name, leaf) in _HEAD_AXES else v) for leaf, v in sub.items()}
    else:
      out[name] = (np.take(np.asarray(sub), pos, axis=_HEAD_AXES[(name,)])
                   if (name,) in _HEAD_AXES else sub)
  return out


def layers_to_drop(spec: str, num_layers: int) -> list[int]:
  """"2,5" (explicit indices), or "top:K" | "bottom:K" | "alternate:K" (Sajjad et al.)."""
  head, _, k = spec.partition(":")
  if head in LAYER_STRATEGIES:
    n = int(k)
    if not 0 < n < num_layers:
      raise ValueError(f"cannot drop {n} of {num_layers} layers (keep one at least)")
    if head == "top":
      return list(range(num_layers - n, num_layers))
    if head == "bottom":
      return list(range(n))
    alternate = list(range(num_layers - 1, -1, -2))
    if n > len(alternate):
      raise ValueError(f"alternate dropping removes at most {len(alternate)} of "
                       f"{num_layers} layers")
    return sorted(alternate[:n])
  layers = sorted({int(x) for x in spec.split(",") if x.strip()})
  if not layers:
    raise ValueError(f"no layers given in {spec!r}")
  bad = [i for i in layers if not 0 <= i < num_layers]
  if bad:
    raise ValueError(f"layers {bad} are not in 0..{num_layers - 1}")
  if len(layers) >= num_layers:
    raise ValueError(f"cannot drop all {num_layers} layers")
  return layers


def drop_layers(cfg: EncoderConfig, params: Any, drop: Iterable[int]
                ) -> tuple[EncoderConfig, Any]:
  """(cfg, params) without the layers `drop`; the others keep their order, renumbered."""
  if cfg.num_layer_groups is not None:
    raise ValueError("cannot drop layers shared across depth (num_layer_groups)")
  drop = set(drop)
  keep = [i for i in range(cfg.num_layers) if i not in drop]
  if not keep or len(drop - set(range(cfg.num_layers))):
    raise ValueError(f"cannot drop layers {sorted(drop)} of {cfg.num_layers}")
  params = dict(params)
  encoder = {k: v for k, v in params["encoder"].items() if not k.startswith("layer_")}
  for new, old in enumerate(keep):
    encoder[f"layer_{new}"] = params["encoder"][f"layer_{old}"]
  params["encoder"] = encoder
  pruned = None if cfg.pruned_heads is None else tuple(cfg.pruned_heads[i] for i in keep)
  if pruned is not None and not any(pruned):
    pruned = None
  return dataclasses.replace(cfg, num_layers=len(keep), pruned_heads=pruned), params


def pad_pruned_heads(cfg: EncoderConfig, params: Any) -> tuple[EncoderConfig, Any]:
  """The pruned model as a full-width one computing the same function: every removed head
  back at its index with zero query/key/value weights and biases and zero output rows
  (its context is 0, so it adds nothing). For consumers that cannot prune on load
  (transformers 5.x dropped `PreTrainedModel.prune_heads` and config.pruned_heads)."""
  if not cfg.pruned_heads:
    return cfg, params
  params = dict(params)
  encoder = dict(params["encoder"])
  for i in range(cfg.num_layers):
    kept = kept_heads(cfg, i)
    if len(kept) == cfg.num_heads:
      continue
    layer = dict(encoder[f"layer_{i}"])
    out = {}
    for name, sub in layer["attention"].items():
      def pad(v, axis):
        v = np.asarray(v)
        shape = list(v.shape)
        shape[axis] = cfg.num_heads
        full = np.zeros(shape, v.dtype)
        index = [slice(None)] * v.ndim
        index[axis] = np.asarray(kept)
        full[tuple(index)] = v
        return full
      if isinstance(sub, dict) or hasattr(sub, "items"):
        out[name] = {leaf: pad(v, _HEAD_AXES[(name, leaf)]) if (name, leaf) in _HEAD_AXES
                     else v for leaf, v in sub.items()}
      else:
        out[name] = pad(sub, _HEAD_AXES[(name,)]) if (name,) in _HEAD_AXES else sub
    layer["attention"] = out
    encoder[f"layer_{i}"] = layer
  params["encoder"] = encoder
  return dataclasses.replace(cfg, pruned_heads=None), params
