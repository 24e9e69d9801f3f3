"""Compute budgets for comparing objectives: steps, tokens or model FLOPs per cell.

FLOPs count what each objective really runs per step: the encoder and its heads (fwd+bwd),
ELECTRA's generator as well as the discriminator, PLM's second (query) stream, and a
distillation teacher's forward pass (one third of a fwd+bwd).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import objectives as objectives_lib
from bert_jax import flops
from bert_jax.encoder import EncoderConfig

BUDGET_KINDS = ("steps", "tokens", "flops")


def _encoder_flops(cfg: EncoderConfig, tokens: int, seq_len: int, factor: float = 1.0) -> float:
  """fwd+bwd FLOPs of the encoder layers over `tokens` (factor 1/3: forward only)."""
  per_token = 6 * flops.encoder_matmul_params_per_token(cfg) + flops.attention_flops_per_token(
      cfg, seq_len)
  return factor * per_token * tokens


def step_flops(config: Any) -> float:
  """Model FLOPs of one training step of a pretraining config."""
  cfg = EncoderConfig.from_dict(config.model)
  b, L = config.train.batch_size, config.data.seq_len
  tokens = b * L
  names = [n for n, _ in objectives_lib.parse_spec(config.objectives)]
  total = 0.0
  shared = any(n in ("mlm", "nsp", "sop", "distill") for n in names)
  if shared:
    total += _encoder_flops(cfg, tokens, L)
  for name in names:
    if name == "mlm":
      total += flops.mlm_head_flops_per_prediction(cfg) * b * config.mlm.max_predictions
    elif name in ("nsp", "sop"):
      total += flops.pair_head_flops_per_sequence(cfg) * b
    elif name == "rtd":
      from objectives.rtd import generator_config
      gen = generator_config(cfg, config.rtd.generator_size, config.rtd.generator_layers or None)
      total += _encoder_flops(cfg, tokens, L)  # discriminator
      total += 6 * (cfg.hidden_size * cfg.hidden_size + cfg.hidden_size) * tokens  # its head
      total += _encoder_flops(gen, tokens, L)
      total += flops.mlm_head_flops_per_prediction(gen) * b * config.rtd.max_predictions
    elif name == "plm":
      total += 2 * _encoder_flops(cfg, tokens, L)  # content + query streams
      preds = getattr(getattr(config, "plm", None), "max_predictions", L // 6)
      total += flops.mlm_head_flops_per_prediction(cfg) * b * preds
    elif name == "distill":
      teacher = _teacher_config(config)
      if teacher is not None:
        total += _encoder_flops(teacher, tokens, L, factor=1 / 3)
        total += flops.mlm_head_flops_per_prediction(teacher) / 3 * b * config.mlm.max_predictions
      total += flops.mlm_head_flops_per_prediction(cfg) * b * config.mlm.max_predictions
  return float(total)


def _teacher_config(config: Any) -> EncoderConfig | None:
  path = getattr(getattr(config, "distill", None), "teacher", "")
  if not path:
    return None
  from bert_jax import run_config
  return EncoderConfig.from_dict(run_config.load(path).model)


@dataclasses.dataclass(frozen=True)
class Budget:
  kind: str  # steps | tokens | flops
  value: float

  def __post_init__(self):
    if self.kind not in BUDGET_KINDS:
      raise ValueError(f"budget.kind: {self.kind!r} is not one of {BUDGET_KINDS}")
    if self.value <= 0:
      raise ValueError(f"budget.value must be positive, got {self.value}")

  def steps_for(self, config: Any) -> int:
    """Training steps that spend this budget under `config` (at least one)."""
    if self.kind == "steps":
      return max(1, int(self.value))
    if self.kind == "tokens":
      per_step = config.train.batch_size * config.data.seq_len
    else:
      per_step = step_flops(config)
    return max(1, int(round(self.value / per_step)))

  def spent(self, config: Any, steps: int) -> float:
    """The budget `steps` steps of `config` use, in this budget's unit."""
    if self.kind == "steps":
      return float(steps)
    if self.kind == "tokens":
      return float(steps * config.train.batch_size * config.data.seq_len)
    return steps * step_flops(config)
