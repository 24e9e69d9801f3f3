"""The objective contract (DESIGN.md, docs/architecture.md): what every objective declares.

An objective is a frozen (hashable) dataclass built from the run's config. In its own file
it declares:

  * `Config`: a frozen dataclass whose fields are the schema of `config.<name>`, with the
    paper's recipe as defaults (presets change values, never the schema);
  * `example_kind`: the host-side examples it needs (`ExampleKind`);
  * `view()`: the encoder input it reads: `CLEAN` (the clean batch) or a `View` (a
    corruption such as MLM's masked ids, made once for every objective that declares an
    equal view, and encoded once for all of them);
  * `runs_encoder`: True when its head runs the shared encoder itself on inputs it makes
    (ELECTRA's sampled ids, PLM's two streams, a layer-wise student with a gradient cut):
    then no shared pass is made for it;
  * `corrupt(clean, key)`: pure and jittable; reads the clean batch, returns only its own
    outputs (they are stored under its name, never over another's keys or the clean ones);
  * `head(...)` and `loss(...)`;
  * its facts: `param_groups()` (the top-level parameter subtrees it owns: they must not
    overlap another objective's, and export reads them), `pooler_path()` (where a pooler
    for fine-tuning lives, if it trains one), `frozen_paths()`, `initialize()`;
  * for bert_jax/hf.py (all optional: by default an objective has no transformers head and
    its run exports the encoder alone): `hf_head_kind` / `hf_head()` (the head, applied at
    every position, that the family tables there lay out as a transformers head), and
    `towers()` / `import_tower()` / `export_tower()` (a second network it trains that
    transformers holds as a model of its own, such as ELECTRA's generator).

Keys: each view and each objective folds the step's key with its own name, so what an
objective sees does not depend on which other objectives run beside it.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
import zlib
from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax

Batch = dict[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Feature:
  """A host-side field the example builder adds to every example because an objective's
  `ExampleKind` asks for it (numpy, never jax).

  name: the field; per_token: an int32 [L] field (else a scalar []); prepare: called once
  per dataset as prepare(context) -> make, with `context` a bert_jax.data.examples
  `FeatureContext` (the corpus and the tokenizer, e.g. its `pieces()`); then
  make(example, offsets) -> the field, for one assembled example and `offsets` (int64 [L],
  the corpus token index of each position, -1 for [CLS], [SEP] and padding). Batches built
  without the builder (the shape-only batches of initialisation and FLOP counting) get
  `fill` (`ExampleKind.complete`).
  """

  name: str
  prepare: Callable[[Any], Callable[[dict, Any], Any]]
  per_token: bool = True
  fill: int = 0


# (corpus, seq_len, rng, short_seq_prob) -> [(parts, label)], parts = [(start, end,
# segment)]: token spans of the corpus, each followed by [SEP] in the example.
Planner = Callable[..., list]


@dataclasses.dataclass(frozen=True)
class ExampleKind:
  """The host-side examples an objective needs (bert_jax/data/examples.py builds them).

  name: the cache key and the name in logs; segments: 1 = packed single segments (full
  sentences), 2 = a segment pair with a `sentence_label`, more = several segments;
  negative (pairs without a planner): how label 1 is made: "random_document" (NSP: B from
  another document) or "swap" (SOP: A and B swapped).

  planner: a host-side numpy function, declared in the objective's file, that plans the
  examples itself: planner(corpus, seq_len, rng, short_seq_prob) -> a list of (parts,
  label), parts a list of (start, end, segment_id) token spans of the corpus (each
  followed by [SEP]; at most `segments` of them), label the example's `sentence_label`.
  features: host-side fields added to every example (`Feature`); a kind with features
  only (no planner, one segment) adds them to whatever examples the other objectives need.
  """

  name: str
  segments: int = 1
  negative: str = ""
  planner: Planner | None = None
  features: tuple[Feature, ...] = ()

  def __post_init__(self):
    if self.segments < 1:
      raise ValueError(f"ExampleKind {self.name!r}: segments must be >= 1")
    if self.planner is None:
      if self.segments not in (1, 2):
        raise ValueError(f"ExampleKind {self.name!r}: segments must be 1 or 2 without a "
                         "planner")
      if (self.segments == 2) != bool(self.negative):
        raise ValueError(f"ExampleKind {self.name!r}: pairs need a negative, singles none")

  @property
  def layout(self) -> tuple:
    """What decides the examples' text (features only add fields to them)."""
    return (self.segments, self.negative, self.planner)

  @property
  def adds_fields_only(self) -> bool:
    return self.layout == (1, "", None)

  def complete(self, batch: dict) -> dict:
    """`batch` with the fill value for each declared feature it lacks (shape-only
    batches made without the builder)."""
    missing = [f for f in self.features if f.name not in batch]
    if not missing:
      return batch
    import jax.numpy as jnp
    shape = batch["input_ids"].shape
    return {**batch, **{f.name: jnp.full(shape if f.per_token else shape[:1], f.fill,
                                         jnp.int32) for f in missing}}


SINGLE = ExampleKind("single")


@dataclasses.dataclass(frozen=True)
class Tower:
  """A network an objective trains beside the shared encoder that transformers holds as a
  model of its own (ELECTRA's generator); bert_jax/hf.py imports it into the objective's
  parameters (`import_tower`) and exports it back (`export_tower`).

  name: what `export_from_workdir(tower=...)` and `load_tower` call it; family: the
  transformers model_type it is written as; groups: the head groups (bert_jax/hf.py's
  layout, next to "encoder") its checkpoint holds.
  """

  name: str
  family: str
  groups: tuple[str, ...]


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


class View(abc.ABC):
  """An encoder input made from the clean batch. Subclasses are frozen dataclasses: equal
  views are made once, with the key folded by `name`, and encoded once."""

  name: ClassVar[str]

  @property
  def features(self) -> tuple[Feature, ...]:
    """Host-side fields the view reads (PMI-masking's units); merged into the run's
    example kind like an objective's."""
    return ()

  @abc.abstractmethod
  def make(self, clean: Batch, key: jax.Array) -> Batch:
    """Pure, jittable: a dict with the encoder's "input_ids" (and the view's targets);
    also "attention_mask" and "segment_ids" when the view moves tokens (a deletion), which
    the encoder then reads instead of the clean batch's."""


@dataclasses.dataclass(frozen=True)
class _Marker:
  name: str

  def __repr__(self):
    return self.name


CLEAN = _Marker("CLEAN")  # the head reads the encoder's pass over the clean batch


def fold_name(key: jax.Array, name: str) -> jax.Array:
  """A key of its own for `name` (an objective or a view), the same in every combination."""
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
  """Base class; subclasses are registered with `objectives.register`."""

  name: ClassVar[str]
  Config: ClassVar[type | None] = None  # the schema of config.<name>; None: no section
  example_kind: ClassVar[ExampleKind] = SINGLE
  runs_encoder: ClassVar[bool] = False

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config: Any, special: SpecialIds) -> "Objective":
    """Build from the full run config (its own section: `cls.section(config)`)."""

  @classmethod
  def complete_config(cls, config: Any) -> None:
    """Fills, in place, config fields this objective derives from elsewhere and that were
    left empty (before the run's budget and setup are made): a distillation student's
    tokenizer is its teacher's. Default: nothing."""
    del config

  @classmethod
  def for_seq_len(cls, config: Any, seq_len: int) -> None:
    """Adjusts config.<name>, in place, to a new data.seq_len where the presets size it by
    the length (a prediction budget). Default: nothing."""
    del config, seq_len

  def torch_peer(self) -> str | None:
    """The transformers model launch/benchmark.py times beside this objective, as
    "module:function" of a builder (objectives/torch_peers.py); the objectives of a run
    must name the same one. None: no PyTorch peer."""
    return None

  @classmethod
  def section(cls, config: Any) -> Any:
    """config.<name> as the typed, validated `Config` dataclass."""
    return section_from(cls.Config, config[cls.name], cls.name)

  def view(self) -> View | _Marker:
    """CLEAN or a View: the input whose pass `head` receives (and whose outputs `inputs`
    holds)."""
    return CLEAN

  def corrupt(self, clean: Batch, key: jax.Array) -> Batch:
    """(clean batch, key) -> this objective's own inputs and targets. Default: none."""
    del clean, key
    return {}

  @abc.abstractmethod
  def head(self, encoder_config: Any, name: str) -> nn.Module:
    """A Flax module called as head(encoded, inputs, encoder, deterministic=...) -> outputs.

    `encoded`: the encoder's output dict over this objective's view (None when it
    `runs_encoder`);
    `inputs`: the clean batch, overlaid with the view's outputs and then its own
    (`original_ids` always holds the clean ids); `encoder`: the shared, bound Encoder.
    """

  @abc.abstractmethod
  def loss(self, outputs: Any, inputs: Batch) -> tuple[jax.Array, Metrics]:
    """(head outputs, inputs) -> (scalar loss, metrics as (sum, count))."""

  def param_groups(self) -> tuple[str, ...]:
    """Top-level parameter subtrees this objective owns (default: its name)."""
    return (self.name,)

  @classmethod
  def pooler_path(cls) -> tuple[str, ...] | None:
    """Where a pooler (dense + tanh on [CLS]) that fine-tuning can start from lives in
    the parameters, if this objective trains one. A class fact: fine-tuning reads it from
    the names in a pretraining run's config, without building the objective."""
    return None

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

  # -------------------------------------------------- Hugging Face (bert_jax/hf.py)

  # The transformers head layout `hf_head` builds, as bert_jax/hf.py's family tables name
  # it; None: no transformers head (export writes the encoder alone).
  hf_head_kind: ClassVar[str | None] = None
  # Its head gives vocabulary logits at the masked view's mlm_positions, from its own
  # from_config alone: what launch.predict's fill-mask runs.
  fills_masks: ClassVar[bool] = False

  @classmethod
  def hf_head(cls, encoder_config: Any, name: str) -> nn.Module:
    """The transformers head at every position: a Flax module whose parameters are
    params[name], called as head(hidden_states, encoder, deterministic=...) -> {"logits":
    ..., and outputs shared by every head, e.g. "pooled"}."""
    raise NotImplementedError(f"objective {cls.name!r} has no transformers head")

  @classmethod
  def towers(cls) -> tuple[Tower, ...]:
    """Networks besides the shared encoder that transformers holds as models of their own.
    Default: none."""
    return ()

  @classmethod
  def import_tower(cls, tower: str, encoder_config: Any, params: dict[str, Any],
                   tower_config: Any, tower_params: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """An imported tower (its EncoderConfig and tree {"encoder", *Tower.groups}) into a
    tree that holds the encoder and this objective's head. Returns (the full tree, the
    config.<name> values the tower implies, facts about it for the caller). Raises
    ValueError when the tower is not one this objective would build."""
    raise ValueError(f"objective {cls.name!r} has no tower {tower!r}")

  @classmethod
  def export_tower(cls, tower: str, encoder_config: Any, params: dict[str, Any],
                   section: Any) -> tuple[Any, dict[str, Any]]:
    """(the tower's EncoderConfig, its tree {"encoder", *Tower.groups}) from a run's
    parameters; `section`: the run's config.<name> (`Config`)."""
    raise ValueError(f"objective {cls.name!r} has no tower {tower!r}")


# ----------------------------------------------------------------------------- config sections


def _base_type(tp: Any) -> tuple[type, bool]:
  """(the type, whether None is allowed) of a field annotation such as `int | None`."""
  if isinstance(tp, (types.UnionType,)) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0], True
  return tp, False


def section_defaults(config_cls: type) -> dict[str, Any]:
  """{field: (default, type, optional)} of a Config dataclass, annotations resolved."""
  hints = typing.get_type_hints(config_cls)
  out = {}
  for f in dataclasses.fields(config_cls):
    tp, optional = _base_type(hints[f.name])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    out[f.name] = (default, tp, optional)
  return out


def section_from(config_cls: type | None, section: Any, name: str) -> Any:
  """A ConfigDict section -> the Config dataclass, with a clear error for unknown fields."""
  if config_cls is None:
    return None
  values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  fields = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f"{name}: unknown fields {unknown}; valid: {sorted(fields)}")
  return config_cls(**values)
