"""Pretraining objectives behind one contract, selected by name from the config.

`config.objectives = "mlm:1.0,nsp:1.0"` picks objectives and their loss weights; each
objective reads its own config section (`config.mlm`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from objectives.base import EXAMPLE_KINDS, Objective, SpecialIds

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
  """Class decorator adding an objective to the registry under `cls.name`."""
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise ValueError(f"objective {cls.name!r} registered twice")
  _REGISTRY[cls.name] = cls
  return cls


def available() -> list[str]:
  _import_builtin()
  return sorted(_REGISTRY)


def get(name: str) -> type[Objective]:
  _import_builtin()
  if name not in _REGISTRY:
    raise ValueError(f"unknown objective {name!r}; available: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


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
    out.append((name.strip(), w))
  if not out:
    raise ValueError(f"objectives: no objective in {spec!r}; available: {available()}")
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"objectives: an objective is listed twice in {spec!r}")
  return out


def build(config: Any, special: SpecialIds) -> tuple[WeightedObjective, ...]:
  """The weighted objectives a config selects, checked for compatibility."""
  chosen = tuple(WeightedObjective(get(n).from_config(config, special), w)
                 for n, w in parse_spec(config.objectives))
  example_kind(chosen)
  return chosen


def example_kind(chosen: tuple[WeightedObjective, ...]) -> str:
  """The one kind of example the selected objectives need together."""
  kinds = {w.objective.example_kind for w in chosen} - {"single"}
  if len(kinds) > 1:
    names = [w.objective.name for w in chosen if w.objective.example_kind != "single"]
    raise ValueError(f"objectives {names} need different sentence-pair examples "
                     f"({sorted(kinds)}); choose one sentence-level objective")
  kind = kinds.pop() if kinds else "single"
  assert kind in EXAMPLE_KINDS, kind
  return kind


def _import_builtin() -> None:
  # Importing a module registers its objectives; kept lazy to avoid import cycles.
  import importlib
  for module in _BUILTIN:
    importlib.import_module(module)


_BUILTIN = ("objectives.mlm", "objectives.nsp", "objectives.sop", "objectives.rtd",
            "objectives.plm", "objectives.distill")

__all__ = ["Objective", "SpecialIds", "WeightedObjective", "available", "build",
           "example_kind", "get", "parse_spec", "register"]
