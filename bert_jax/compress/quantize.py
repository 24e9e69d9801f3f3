"""int8 quantization of a fine-tuned model with qwix (Google's JAX quantization library).

qwix intercepts the `dot_general` / `einsum` calls of chosen Flax modules. The rules here
pick the encoder's dense layers (attention query/key/value/output, the FFN's intermediate
and output, MobileBERT's bottlenecks and stacked FFNs): their weights become int8
(symmetric, per output channel, absmax) and their input activations int8 (symmetric,
per tensor). The attention scores and the context (activation x activation einsums), the
embeddings, LayerNorms, the pooler and the task's classifier stay in float32.

- Post-training quantization (PTQ, `ptq_params`): activation scales are static, calibrated
  on a few training batches (qwix's QtProvider collects the running mean of each input's
  absmax in the "quant_stats" collection), then `qwix.quantize_params` turns the float
  tree into int8 values with their scales; `ptq_model` runs it (int8 x int8 -> int32 dots).
- Quantization-aware fine-tuning (QAT, `qat_model`): the same rules under QtProvider
  fake-quantize weights and activations in the forward pass (straight-through gradients);
  activation scales are dynamic (per token) while training, so the training step needs no
  mutable state. The result is then converted like any float model (PTQ on its weights).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The encoder's dense layers (module paths under the fine-tuning model, see bert_jax.model).
DENSE_PATH = (r"encoder/layer_\d+/(attention/(query|key|value|output)|"
              r"ffn(_stack_\d+)?/(intermediate|output)|bottleneck_\w+)")
ACTS = ("int8", "none")
# Activations enter these layers as [batch, length, ...]: statistics are averaged over both.
_ACT_BATCH_AXES = (0, 1)


def _qwix():
  try:
    import qwix
  except ImportError as e:  # pragma: no cover - a setup problem, said once
    raise ImportError("int8 quantization needs qwix: pip install 'qwix>=0.1.8'") from e
  return qwix


def _rule(cls, act: str, static: bool, **extra):
  if act not in ACTS:
    raise ValueError(f"quant.act={act!r} is not one of {ACTS}")
  kw = dict(module_path=DENSE_PATH, weight_qtype=jnp.int8)
  if act == "int8":
    kw.update(act_qtype=jnp.int8, act_static_scale=static, act_batch_axes=_ACT_BATCH_AXES)
  return cls(**kw, **extra)


def qat_model(model: nn.Module, act: str = "int8", *, static: bool = False) -> nn.Module:
  """`model` with fake-quantized dense layers (qwix QT): for quantization-aware training
  (`static=False`: dynamic activation scales) or for calibration (`static=True`: the
  "quant_stats" collection accumulates each activation's absmax)."""
  qwix = _qwix()
  return qwix.quantize_model(model, qwix.QtProvider([_rule(qwix.QtRule, act, static)]))


def ptq_model(model: nn.Module, act: str = "int8") -> nn.Module:
  """`model` running int8 weights (and statically scaled int8 activations) as
  `ptq_params` makes them."""
  qwix = _qwix()
  return qwix.quantize_model(model, qwix.PtqProvider([_rule(qwix.QuantizationRule, act, True)]))


def calibrate(model: nn.Module, params: Any, batches: Iterable[dict[str, np.ndarray]],
              act: str = "int8") -> Any:
  """The "quant_stats" of the activations over `batches` (running mean of their absmax)."""
  if act == "none":
    return {}
  calib = qat_model(model, act, static=True)

  @jax.jit
  def step(params, stats, batch):
    variables = {"params": params}
    if stats is not None:
      variables["quant_stats"] = stats
    _, new = calib.apply(variables, batch, deterministic=True, mutable=["quant_stats"])
    return new["quant_stats"]

  stats = None
  for batch in batches:
    stats = step(params, stats, batch)
  if stats is None:
    raise ValueError("calibration needs at least one batch")
  return stats


def ptq_params(model: nn.Module, params: Any, batches: Iterable[dict[str, np.ndarray]],
               sample: dict[str, np.ndarray], act: str = "int8") -> Any:
  """The float `params` of `model` -> the int8 tree `ptq_model(model, act)` runs:
  weights quantized, activation scales calibrated on `batches`."""
  qwix = _qwix()
  params = jax.tree.map(jnp.asarray, params)  # qwix finds weights by identity: jax arrays
  stats = calibrate(model, params, batches, act)
  ptq = ptq_model(model, act)
  abstract = jax.eval_shape(lambda: ptq.init({"params": jax.random.PRNGKey(0)}, sample,
                                             deterministic=True))["params"]
  return qwix.quantize_params(params, abstract, stats)


# ----------------------------------------------------------------------------- storage


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def flat_arrays(qparams: Any) -> dict[str, np.ndarray]:
  """The quantized tree as {path: array} (int8 values, float scales, float rest)."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(qparams))[0]
  return {_key(p): np.asarray(v) for p, v in leaves}


def save(qparams: Any, path: str) -> int:
  """Writes the int8 tree to `path` (.npz, uncompressed); returns its bytes on disk."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **flat_arrays(qparams))
  return os.path.getsize(path)


def load(path: str, abstract: Any) -> Any:
  """The tree `save` wrote, in the structure of `abstract` (`ptq_params`' output shape,
  e.g. from jax.eval_shape of the PTQ model's init)."""
  with np.load(path) as f:
    stored = {k: f[k] for k in f.files}
  abstract = nn.meta.unbox(abstract)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  missing = [_key(p) for p, _ in leaves if _key(p) not in stored]
  if missing:
    raise ValueError(f"{path} lacks {missing[:5]} (not this model's int8 weights)")
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(stored[_key(p)]) for p, _ in leaves])


def dequantized(model: nn.Module, qparams: Any, params: Any) -> Any:
  """`params` with each quantized kernel replaced by its int8 values x scale (float32):
  what the int8 model computes with, for float consumers (transformers export)."""
  qwix = _qwix()
  flat_q = flat_arrays(qparams)
  out = jax.tree.map(np.asarray, params)

  def walk(tree, prefix):
    res = {}
    for k, v in tree.items():
      key = f"{prefix}{k}"
      if isinstance(v, dict):
        res[k] = walk(v, key + "/")
      elif f"{key}/array/qvalue" in flat_q:
        q, s = flat_q[f"{key}/array/qvalue"], flat_q[f"{key}/array/scale"]
        res[k] = np.asarray(qwix.dequantize(qwix.QArray(jnp.asarray(q), jnp.asarray(s),
                                                        qtype=jnp.int8)), np.float32
                            ).reshape(np.shape(v))
      else:
        res[k] = v
    return res

  del model
  return walk(out, "")


def quantized_bytes(qparams: Any) -> int:
  return int(sum(a.nbytes for a in flat_arrays(qparams).values()))
