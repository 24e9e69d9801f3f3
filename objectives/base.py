"""The objective contract (DESIGN.md): what every pretraining objective declares.

An objective is a frozen (hashable) dataclass built from the run's config. It says which
examples it needs, corrupts a batch on device (pure, jittable, randomness only from the
key it is given), provides its head as a Flax module on top of the shared encoder, and
turns the head's outputs into a scalar loss plus metrics as (sum, count) pairs.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax

Batch = dict[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]

# What the host-side example builder must produce for an objective.
EXAMPLE_KINDS = ("single", "nsp", "sop")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Token ids the objectives need, taken from the run's tokenizer."""

  pad: int
  unk: int
  cls: int
  sep: int
  mask: int
  first_regular: int  # ids below this are special tokens
  vocab_size: int  # the tokenizer's vocabulary (the model's table may be padded beyond it)


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
  """Base class; subclasses are registered with `objectives.register`."""

  name: ClassVar[str]
  example_kind: ClassVar[str] = "single"
  # False when the objective runs the encoder itself (ELECTRA's discriminator input, PLM's
  # two streams) so the model can skip the shared forward pass it would not use.
  uses_shared_forward: ClassVar[bool] = True

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config: Any, special: SpecialIds) -> "Objective":
    """Build from the full run config (its section named after the objective)."""

  def corrupt(self, batch: Batch, key: jax.Array) -> Batch:
    """(batch, key) -> batch with this objective's inputs and targets. Default: unchanged."""
    del key
    return batch

  @abc.abstractmethod
  def head(self, encoder_config: Any, name: str) -> nn.Module:
    """A Flax module called as head(encoded, batch, encoder, deterministic=...) -> outputs.

    `encoded` is the shared forward pass's output dict (None when no objective uses it);
    `encoder` is the shared, bound Encoder, for tied embeddings or extra passes.
    """

  @abc.abstractmethod
  def loss(self, outputs: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
    """(head outputs, batch) -> (scalar loss, metrics as (sum, count))."""

  def frozen_paths(self) -> tuple[tuple[str, ...], ...]:
    """Parameter subtrees the optimizer never updates and keeps no state for (a teacher).

    Paths are key tuples into params, e.g. (("distill", "teacher"),). Their heads should
    also stop gradients so no backward pass is spent on them.
    """
    return ()

  def initialize(self, params: dict[str, Any]) -> dict[str, Any]:
    """Host-side edit of freshly initialised parameters (load a teacher, copy layers into
    the student). Called once per run, never on resume. Default: unchanged."""
    return params
