"""Objectives behind one contract (objectives/base.py), selected by name from the config.

`config.objectives = "mlm:1.0,nsp:1.0"` picks objectives and their loss weights; each
objective reads its own config section (`config.mlm`, ...), whose schema is its `Config`
dataclass. `compose` checks a combination once, when the config is built: it is either
valid (each objective's loss is what it gives alone on the same key) or refused, saying why.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax

from objectives.base import (CLEAN, SINGLE, Batch, ExampleKind, Feature, Objective,
                             SpecialIds, Tower, View, fold_name, section_defaults,
                             section_from)

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
  """Class decorator adding an objective to the registry under `cls.name`."""
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise ValueError(f"objective {cls.name!r} registered twice")
  _REGISTRY[cls.name] = cls
  return cls


def unregister(name: str) -> None:
  """Removes an objective registered from outside this package (a notebook's, a test's)."""
  _REGISTRY.pop(name, None)


def complete_config(config: Any) -> Any:
  """A copy of `config` with what each of its objectives derives from elsewhere filled in
  (`Objective.complete_config`: e.g. a distillation student's tokenizer, its teacher's).
  Names not registered are left to the build's error."""
  config = copy.deepcopy(config)
  for n, _ in parse_spec(config.objectives):
    if n in available():
      get(n).complete_config(config)
  return config


def available() -> list[str]:
  _import_builtin()
  return sorted(_REGISTRY)


def get(name: str) -> type[Objective]:
  _import_builtin()
  if name not in _REGISTRY:
    raise ValueError(f"unknown objective {name!r}; available: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def config_sections() -> dict[str, dict[str, tuple[Any, type, bool]]]:
  """{objective: {field: (default, type, optional)}} for every registered objective with a
  config section: what configs/pretrain.py turns into `config.<name>`."""
  return {name: section_defaults(cls.Config) for name, cls in
          ((n, get(n)) for n in available()) if cls.Config is not None}


@dataclasses.dataclass(frozen=True)
class WeightedObjective:
  objective: Objective
  weight: float


def parse_spec(spec: str) -> list[tuple[str, float]]:
  """'mlm:1.0,sop:0.5' -> [('mlm', 1.0), ('sop', 0.5)]; a missing weight means 1.0."""
  out = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    name, _, weight = part.partition(":")
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"objectives: bad weight {weight!r} in {spec!r} "
                       "(expected e.g. 'mlm:1.0,nsp:1.0')") from None
    if not w > 0:  # a negative weight would train the model to raise that loss
      raise ValueError(f"objectives: the weight of {name.strip()!r} must be positive, got "
                       f"{weight!r} in {spec!r}")
    out.append((name.strip(), w))
  if not out:
    raise ValueError(f"objectives: no objective in {spec!r}; available: {available()}")
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"objectives: an objective is listed twice in {spec!r}")
  return out


@dataclasses.dataclass(frozen=True)
class Composition:
  """The weighted objectives of a run and the distinct encoder inputs (views) they read.

  The corrupted batch is {"clean": the batch as loaded, "views": (one dict per view),
  "own": {objective: its corrupt() outputs}}; `inputs` gives one objective the clean batch
  overlaid with its view's outputs and then its own.
  """

  objectives: tuple[WeightedObjective, ...]
  views: tuple[View, ...]

  def __iter__(self):
    return iter(self.objectives)

  def __len__(self):
    return len(self.objectives)

  def __getitem__(self, i: int) -> WeightedObjective:
    return self.objectives[i]

  @property
  def example_kind(self) -> ExampleKind:
    return merge_kinds(_kinds(self.objectives))

  def view_index(self, objective: Objective) -> int | None:
    """Index into `views` of the objective's view; None for the clean input."""
    v = objective.view()
    return None if v is CLEAN else self.views.index(v)

  def passes(self) -> tuple[int | None, ...]:
    """The encoder passes the model makes: view indices (None: the clean input), each
    once, for the objectives that do not run the encoder themselves."""
    out: list[int | None] = []
    for w in self.objectives:
      i = self.view_index(w.objective)
      if not w.objective.runs_encoder and i not in out:
        out.append(i)
    return tuple(out)

  def corrupt(self, clean: Batch, key: jax.Array) -> dict[str, Any]:
    clean = self.example_kind.complete(clean)
    return {"clean": clean,
            "views": tuple(v.make(clean, fold_name(key, "view/" + v.name)) for v in self.views),
            "own": {w.objective.name: w.objective.corrupt(clean, fold_name(key, w.objective.name))
                    for w in self.objectives}}

  def inputs(self, batch: dict[str, Any], objective: Objective) -> Batch:
    i = self.view_index(objective)
    view = batch["views"][i] if i is not None else {}
    clean = batch["clean"]
    return {**clean, "original_ids": clean.get("original_ids", clean["input_ids"]), **view,
            **batch["own"].get(objective.name, {})}

  def param_groups(self) -> dict[str, str]:
    """{top-level parameter subtree: the objective that owns it}."""
    return {g: w.objective.name for w in self.objectives for g in w.objective.param_groups()}


def _kinds(weighted) -> tuple[tuple[str, ExampleKind], ...]:
  """(name, kind) of each objective, and of each view that reads host-side fields."""
  kinds = [(w.objective.name, w.objective.example_kind) for w in weighted]
  views = {w.objective.view(): w.objective.name for w in weighted}
  kinds += [(f"{name} (view {v.name})", ExampleKind(v.name, features=v.features))
            for v, name in views.items() if v is not CLEAN and v.features]
  return tuple(kinds)


def compose(weighted: tuple[WeightedObjective, ...]) -> Composition:
  """Checks that the objectives can run together and collects their distinct views."""
  merge_kinds(_kinds(weighted))
  owner: dict[str, str] = {}
  for w in weighted:
    for group in w.objective.param_groups():
      if group == "encoder":
        raise ValueError(f"objective {w.objective.name!r} claims params['encoder'], the "
                         "shared encoder's")
      if group in owner:
        raise ValueError(f"objectives {owner[group]!r} and {w.objective.name!r} both train "
                         f"params[{group!r}]; they cannot run together (drop one)")
      owner[group] = w.objective.name
  views: list[View] = []
  for w in weighted:
    v = w.objective.view()
    if v is not CLEAN and v not in views:
      views.append(v)
  return Composition(tuple(weighted), tuple(views))


def merge_kinds(named: tuple[tuple[str, ExampleKind], ...]) -> ExampleKind:
  """The one kind of example that serves every (objective, kind): at most one layout
  other than single segments (a batch holds one kind), plus the union of the features.
  Raises ValueError, naming the objectives, when no such kind exists."""
  layouts = {k.layout: k for _, k in named if not k.adds_fields_only}
  if len(layouts) > 1:
    names = [n for n, k in named if not k.adds_fields_only]
    raise ValueError(f"objectives {names} need different kinds of examples "
                     f"({sorted(k.name for k in layouts.values())}): one batch holds one "
                     "kind; choose one of them")
  base = next(iter(layouts.values())) if layouts else SINGLE
  features: dict[str, Any] = {}
  for n, k in named:
    for f in k.features:
      if f.name in features and features[f.name] != f:
        raise ValueError(f"objective {n!r} declares the example field {f.name!r}, which "
                         "another objective declares differently")
      features[f.name] = f
  if tuple(features.values()) == base.features:
    return base
  return dataclasses.replace(base, features=tuple(features.values()))


def build(config: Any, special: SpecialIds) -> Composition:
  """The weighted objectives a config selects, checked for compatibility."""
  return compose(tuple(WeightedObjective(get(n).from_config(config, special), w)
                       for n, w in parse_spec(config.objectives)))


def example_kind(chosen: Composition) -> ExampleKind:
  """The one kind of example the selected objectives need together."""
  return chosen.example_kind


def _import_builtin() -> None:
  # Importing a module registers its objectives; kept lazy to avoid import cycles.
  import importlib
  for module in _BUILTIN:
    importlib.import_module(module)


_BUILTIN = ("objectives.mlm", "objectives.nsp", "objectives.sop", "objectives.rtd",
            "objectives.plm", "objectives.distill", "objectives.wso", "objectives.tdd",
            "objectives.cap", "objectives.tdr", "objectives.sso", "objectives.sro",
            "objectives.sdp")

__all__ = ["CLEAN", "SINGLE", "Composition", "ExampleKind", "Feature", "Objective",
           "SpecialIds", "Tower", "View", "WeightedObjective", "available", "build", "compose",
           "config_sections", "corrupt_one", "example_kind", "get", "merge_kinds", "parse_spec",
           "register", "section_from"]


def corrupt_one(objective: Objective, clean: Batch, key: jax.Array):
  """(the model's corrupted batch, the objective's inputs) for one objective alone."""
  comp = compose((WeightedObjective(objective, 1.0),))
  batch = comp.corrupt(clean, key)
  return batch, comp.inputs(batch, objective)
