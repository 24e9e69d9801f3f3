"""Command-line config handling shared by the launchers.

ml_collections' config_flags applies `--config.a.b=v` overrides to a locked ConfigDict; a
misspelt field fails there with a terse KeyError. We check the override names first so the
error names the field and the valid choices.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Sequence

import ml_collections
from ml_collections import config_flags

from bert_jax import run_config
from launch import errors


def check_override_names(config: ml_collections.ConfigDict, argv: Sequence[str],
                         flag: str = "config") -> None:
  valid = set(run_config.flatten(config))
  groups = {k.rsplit(".", 1)[0] for k in valid if "." in k}
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    name = arg[len(prefix):].split("=", 1)[0]
    if name in valid or name in groups:
      continue
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    parent = parent if parent in groups else ""  # an unknown section: list the top level
    siblings = sorted(k[len(parent) + 1:] for k in valid
                      if parent and k.startswith(parent + ".")) or sorted(
                          {k.split(".")[0] for k in valid})
    close = difflib.get_close_matches(name, sorted(valid), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    errors.fail(f"unknown config field {name!r}.{hint} Valid fields"
                f"{' of ' + parent if parent else ''}: {', '.join(siblings)}")


def _config_spec(argv: Sequence[str], flag: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      return arg.split("=", 1)[1]
    if arg == f"--{flag}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/pretrain.py:bert,tiny' -> the ConfigDict that file's get_config returns."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_checked_config", path)
  if module_spec is None or not os.path.exists(path):
    errors.fail(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def define_config(default: str, help_text: str, flag: str = "config") -> None:
  """DEFINE_config_file, with the --config.* names checked first.

  config_flags loads the default config and applies the overrides in sys.argv as soon as
  the flag is defined, so the check has to run before that, not in the flags parser.
  """
  overrides = [a for a in sys.argv[1:] if a.startswith(f"--{flag}.")]
  if overrides:
    try:
      config = load_config_file(_config_spec(sys.argv, flag) or default)
    except ValueError as e:  # e.g. an unknown preset
      if errors.verbose():
        raise
      errors.fail(str(e))
    check_override_names(config, overrides, flag)
  config_flags.DEFINE_config_file(flag, default, help_text)
