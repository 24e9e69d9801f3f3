"""Training FLOPs of a step, device peak FLOP/s, and model FLOPs utilisation (MFU).

FLOPs per token follow the usual accounting (Kaplan et al. 2020; PaLM appendix B), with
fwd + bwd = 3 x forward and 2 FLOPs per multiply-add:

  6 x non-embedding matmul parameters of the encoder stack      (the dense layers)
  + 12 x layers x seq_len x hidden                              (QK^T and AV, fwd+bwd)
  + 6 x (hidden x embed + embed x vocab) x predicted / seq_len   (MLM transform + tied
                                                                  output projection, only
                                                                  at the positions computed)

Embedding lookups, LayerNorm, softmax and biases are not counted (they are not matmuls);
rematerialised recomputation is not counted either, so this is MFU, not hardware FLOPs
utilisation. The peak is the device's published dense (no sparsity) figure for the
compute dtype, or on CPU a measured matmul peak (`measure_cpu_matmul_peak`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Published dense peak FLOP/s per JAX device, keyed by a substring of `device.device_kind`
# (checked in order: the most specific first). "fp32" is the figure for fp32 matmuls at
# JAX's default precision: TF32 tensor cores on NVIDIA Ampere/Hopper (XLA's default for
# fp32 dots there), one bf16 pass on TPUs (so the same figure as bf16).
# Sources: NVIDIA H100/H200/A100 datasheets (SXM unless named), Google Cloud TPU docs.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12}),
    ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}),
    ("H100 NVL", {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12}),
    ("H100 PCIe", {"bfloat16": 756.5e12, "float16": 756.5e12, "float32": 378.0e12}),
    ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12}),  # SXM, HBM3
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("TPU v6", {"bfloat16": 918e12, "float32": 918e12}),  # Trillium (v6e), per chip
    ("TPU v5p", {"bfloat16": 459e12, "float32": 459e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),  # v5e
    ("TPU v5e", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),  # v5p reports "TPU v5"
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),  # per chip (megacore)
    ("TPU v3", {"bfloat16": 61.5e12, "float32": 61.5e12}),  # per core (a JAX device)
    ("TPU v2", {"bfloat16": 22.5e12, "float32": 22.5e12}),  # per core
)


def published_peak(device_kind: str, dtype: str) -> float | None:
  """The table's peak FLOP/s for one device of this kind in `dtype`, or None."""
  for key, peaks in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peaks.get(dtype, peaks.get("float32"))
  return None


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_s: float  # per device
  source: str  # "published: <table key>" or "measured: ..."


def measure_cpu_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5,
                            device: Any | None = None) -> Peak:
  """Best-of-`repeats` FLOP/s of one jitted [n, n] x [n, n] matmul on one device."""
  dt = jnp.dtype(dtype)
  device = device or jax.local_devices()[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dt), device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return Peak(2 * n ** 3 / best, f"measured: best of {repeats} jitted {n}x{n} {dtype} matmuls")


def device_peak(device: Any, dtype: str, *, measure_on_cpu: bool = True) -> Peak | None:
  """Published peak for GPUs/TPUs in the table; a measured matmul peak on CPU."""
  peak = published_peak(device.device_kind, dtype)
  if peak is not None:
    key = next(k for k, _ in PEAK_FLOPS if k.lower() in device.device_kind.lower())
    return Peak(peak, f"published: {key} {dtype} dense")
  if device.platform == "cpu" and measure_on_cpu:
    return measure_cpu_matmul_peak(dtype, device=device)
  return None


# ----------------------------------------------------------------------------- counting


def encoder_matmul_params_per_token(cfg: Any) -> int:
  """Weights of the dense layers one token passes through (not the embedding tables).

  Counts every layer application, so ALBERT's shared layers count once per use. MobileBERT:
  attention and FFNs at the bottleneck width, the bottleneck projections, stacked FFNs.
  """
  h, f, e, i = cfg.hidden_size, cfg.intermediate_size, cfg.embed_size, cfg.inner_size
  if cfg.intra_bottleneck_size is None:
    qkv = 3 * h * i
    bottleneck = 0
  elif cfg.use_bottleneck_attention:
    qkv, bottleneck = 3 * i * i, 2 * h * i
  elif cfg.key_query_shared_bottleneck:  # q, k from their own bottleneck, v from the input
    qkv, bottleneck = 2 * i * i + h * i, 3 * h * i
  else:
    qkv, bottleneck = 3 * h * i, 2 * h * i
  per_layer = qkv + i * i + cfg.num_feedforward_networks * 2 * i * f + bottleneck
  projection = (3 if cfg.trigram_input else 1) * e * h if cfg.embedding_projection else 0
  return cfg.num_layers * per_layer + projection


def attention_flops_per_token(cfg: Any, seq_len: int) -> int:
  """QK^T and AV, forward and backward: 12 x layers x seq_len x attention width."""
  return 12 * cfg.num_layers * seq_len * cfg.inner_size


def mlm_head_flops_per_prediction(cfg: Any, vocab_size: int | None = None) -> int:
  """Transform and the tied output projection, fwd+bwd: hidden -> embed -> vocab, or
  (MobileBERT) hidden -> hidden -> vocab through the embeddings and their extra rows."""
  v = vocab_size or cfg.vocab_size
  width = cfg.hidden_size if cfg.project_word_embeddings else cfg.embed_size
  return 6 * (cfg.hidden_size * width + width * v)


def pair_head_flops_per_sequence(cfg: Any) -> int:
  """Pooler (hidden x hidden) and the 2-way classifier on [CLS], fwd+bwd."""
  return 6 * (cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Model FLOPs of one training step, split by where they go."""

  tokens: int  # batch x seq_len
  dense: float  # 6 x non-embedding params per token
  attention: float
  output: float  # MLM transform + vocabulary projection at the computed positions
  other: float = 0.0  # pair heads (NSP/SOP) and the like

  @property
  def total(self) -> float:
    return self.dense + self.attention + self.output + self.other

  @property
  def per_token(self) -> float:
    return self.total / self.tokens

  def as_dict(self) -> dict[str, float]:
    return {"tokens": self.tokens, "dense": self.dense, "attention": self.attention,
            "output": self.output, "other": self.other, "total": self.total,
            "per_token": self.per_token}


def mlm_step_flops(cfg: Any, batch_size: int, seq_len: int, predictions_per_seq: int,
                   pair_head: bool = False) -> StepFlops:
  """An encoder + MLM (+ NSP/SOP) step; `predictions_per_seq` is seq_len when every
  position gets vocabulary logits (predict_all, Hugging Face) and max_predictions when
  only the gathered masked positions do."""
  tokens = batch_size * seq_len
  return StepFlops(
      tokens=tokens,
      dense=6.0 * encoder_matmul_params_per_token(cfg) * tokens,
      attention=float(attention_flops_per_token(cfg, seq_len)) * tokens,
      output=float(mlm_head_flops_per_prediction(cfg)) * batch_size * predictions_per_seq,
      other=float(pair_head_flops_per_sequence(cfg)) * batch_size if pair_head else 0.0)


def electra_step_flops(disc_cfg: Any, gen_cfg: Any, batch_size: int, seq_len: int,
                       predictions_per_seq: int) -> StepFlops:
  """ELECTRA: the generator (a smaller encoder + MLM head at the computed positions) and
  the discriminator (encoder + a dense(H) -> dense(1) head at every token), both trained."""
  tokens = batch_size * seq_len
  disc_head = disc_cfg.hidden_size * disc_cfg.hidden_size + disc_cfg.hidden_size
  return StepFlops(
      tokens=tokens,
      dense=6.0 * (encoder_matmul_params_per_token(disc_cfg)
                   + encoder_matmul_params_per_token(gen_cfg) + disc_head) * tokens,
      attention=float(attention_flops_per_token(disc_cfg, seq_len)
                      + attention_flops_per_token(gen_cfg, seq_len)) * tokens,
      output=float(mlm_head_flops_per_prediction(gen_cfg)) * batch_size * predictions_per_seq)


def mfu(step_flops: float, step_time_s: float, peak_flops_per_s: float,
        num_devices: int = 1) -> float:
  """Achieved FLOP/s over the peak of all `num_devices` devices the step ran on."""
  return step_flops / step_time_s / (peak_flops_per_s * num_devices)


def xla_flops(compiled: Any) -> float | None:
  """XLA's own FLOP count of a compiled function (per device), where it reports one."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])
