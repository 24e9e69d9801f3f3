"""Command-line config handling shared by the launchers.

ml_collections' config_flags applies `--config.a.b=v` overrides to a locked ConfigDict; a
misspelt field fails there with a terse KeyError. We check the override names first so the
error names the field and the valid choices.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import ml_collections

from bert_jax import run_config


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
    siblings = sorted(k[len(parent) + 1:] for k in valid
                      if parent and k.startswith(parent + ".")) or sorted(
                          {k.split(".")[0] for k in valid})
    close = difflib.get_close_matches(name, sorted(valid), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise SystemExit(f"error: unknown config field {name!r}.{hint} Valid fields"
                     f"{' of ' + parent if parent else ''}: {', '.join(siblings)}")


def parse_flags_checked(argv: Sequence[str]) -> list[str]:
  """absl flags parser for app.run: checks --config.* names before applying them."""
  from absl import flags
  FLAGS = flags.FLAGS
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  FLAGS([a for a in argv if not a.startswith("--config.")])  # loads the config file alone
  check_override_names(FLAGS.config, overrides)
  FLAGS.unparse_flags()
  return FLAGS(list(argv))
