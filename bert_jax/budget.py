"""Compute budgets for comparing objectives: steps, tokens or FLOPs per cell.

FLOPs are XLA's count of the compiled training step (`compiled.cost_analysis()`), so they
are whatever each objective really runs: the encoder passes and heads (fwd+bwd), ELECTRA's
generator, PLM's query stream, a distillation teacher's forward pass, and also the
optimizer update and the elementwise work (softmax, LayerNorm, GELU) that hand formulas
leave out (bert,tiny MLM: about 1.1x bert_jax.flops' model FLOPs, tests/test_ablate.py).
A new objective is counted without any code here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

BUDGET_KINDS = ("steps", "tokens", "flops")


def stand_in_special(vocab_size: int):
  """Special ids for building a step without a tokenizer (the count does not depend on
  which ids they are)."""
  from objectives.base import SpecialIds
  return SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5,
                    vocab_size=int(vocab_size))


def counting_config(config: Any):
  """The config whose step is counted: one micro-batch per step (XLA counts a loop's body
  once), no rematerialisation, XLA's attention (a fused kernel's custom call is not
  counted): what an objective computes, not how a run schedules it."""
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.grad_accum = 1
  c.model.remat = "none"
  c.model.attention_impl = "xla"
  return c


def compiled_step_flops(config: Any) -> float:
  """XLA's FLOP count of one `train.train_step` of `config`, lowered from abstract shapes
  on a one-device mesh (so it is the whole batch's)."""
  import jax
  import ml_collections
  from bert_jax import flops, sharding, train

  c = counting_config(config)
  setup = train.build_setup(c, stand_in_special(c.model.vocab_size), total_steps=1)
  kind = setup.objectives.example_kind
  sample = train.dummy_batch(int(c.train.batch_size), int(c.data.seq_len), kind.name)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  rules = sharding.logical_rules(c.sharding)
  abstract, shardings = train.state_shardings(setup, int(c.seed), sample, mesh, rules)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in sample.items()}
  with sharding.activate(mesh, rules):
    compiled = jax.jit(functools.partial(train.train_step, setup=setup),
                       out_shardings=(shardings, None)).lower(abstract, batch).compile()
  count = flops.xla_flops(compiled)
  if not count:
    raise RuntimeError(f"XLA reports no FLOP count for the step on {jax.default_backend()}; "
                       "use a steps or tokens budget")
  return count


@functools.lru_cache(maxsize=None)
def _cached_step_flops(config_json: str) -> float:
  import json
  import ml_collections
  return compiled_step_flops(ml_collections.ConfigDict(json.loads(config_json)))


def step_flops(config: Any) -> float:
  """FLOPs of one training step of a pretraining config (compiled once per config)."""
  return _cached_step_flops(counting_config(config).to_json_best_effort(sort_keys=True))


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
