"""Continued pretraining (domain- and task-adaptive, Gururangan et al. 2020): a new run whose
weights start from another workdir's checkpoint, ours or `launch.import_hf`'s.

`--config.init_from=WORKDIR` takes that workdir's architecture (its encoder config) and
tokenizer, and at step 0 its parameters wherever the new model has a parameter of the
same name and shape (the encoder always; heads the two runs share, e.g. MLM's); what the
new run adds (another objective's head) starts fresh. The optimizer state is new, and so
is the schedule: `train.steps` counts from 0. A resumed run restores its own checkpoint
and ignores init_from.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import run_config, sharding
from bert_jax.data import tokenizer as tokenizer_lib

ENCODER_CONFIG_FILE = "encoder_config.json"  # as bert_jax.finetune.restore (a fine-tuned run)


def source_model(init_from: str) -> dict[str, Any]:
  """The encoder config fields of `init_from` (a pretraining, imported or fine-tuned run)."""
  if not os.path.isfile(os.path.join(init_from, run_config.CONFIG_FILE)):
    raise FileNotFoundError(f"init_from={init_from!r} is not a bert-jax workdir (no "
                            f"{run_config.CONFIG_FILE}); import a Hugging Face model first "
                            "with `python -m launch.import_hf`")
  path = os.path.join(init_from, ENCODER_CONFIG_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return run_config.load(init_from).model.to_dict()


def apply_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with init_from's architecture and tokenizer (a copy; unchanged without
  init_from). Fields the user set differently from the preset are overridden: the weights
  decide the architecture."""
  src = config.get("init_from") or ""
  if not src:
    return config
  src = os.path.abspath(src)
  fields = source_model(src)
  config = ml_collections.ConfigDict(config.to_dict())
  unknown = sorted(set(fields) - set(config.model))
  if unknown:
    raise ValueError(f"init_from={src!r}: encoder fields {unknown} unknown to this version")
  for k, v in fields.items():
    config.model[k] = tuple(map(tuple, v)) if k == "pruned_heads" and v else v
  if not config.data.tokenizer:
    tok = tokenizer_lib.workdir_tokenizer(src)
    if tok is None:
      raise ValueError(f"init_from={src!r} holds no tokenizer; give --config.data.tokenizer")
    config.data.tokenizer = str(tok)
  config.data.vocab_size = int(fields["vocab_size"])
  config.init_from = src
  return config


def load_matching(state, shardings, setup, config: ml_collections.ConfigDict, mesh, rules,
                  log=print):
  """The fresh state with init_from's parameters where name and shape match, and a new
  optimizer state for them."""
  src = config.init_from
  which = config.get("init_which", "latest") or "latest"
  params, step = checkpoint_lib.restore_params(src, None, which)
  params = jax.tree.map(np.asarray, params)
  if "encoder" not in params:
    raise ValueError(f"init_from={src!r}: its checkpoint has no 'encoder' ({sorted(params)})")
  fresh = state.params
  loaded, kept = [], []

  def merge(new, old, path):
    if isinstance(new, dict):
      return {k: merge(v, old.get(k) if isinstance(old, dict) else None, path + (k,))
              for k, v in new.items()}
    name = "/".join(path)
    if old is not None and tuple(np.shape(old)) == tuple(new.shape):
      loaded.append(name)
      return np.asarray(old, new.dtype)
    kept.append(name)
    return new

  host = jax.tree.map(np.asarray, jax.device_get(fresh))
  merged = merge(host, params, ())
  enc_missing = [n for n in kept if n.startswith("encoder/")]
  if enc_missing:
    raise ValueError(f"init_from={src!r}: encoder parameters {enc_missing[:5]} do not match "
                     "the model (architecture fields overridden on the command line?)")
  heads_loaded = sorted({n.split("/")[0] for n in loaded} - {"encoder"})
  heads_fresh = sorted({n.split("/")[0] for n in kept})
  log(f"continued pretraining from {src} step {step}: encoder"
      + (f" and {', '.join(heads_loaded)}" if heads_loaded else "") + " loaded"
      + (f"; {', '.join(heads_fresh)} fresh" if heads_fresh else "") + "; a new optimizer")
  logging.info("init_from %s step %d: loaded %d arrays, fresh %d", src, step, len(loaded),
               len(kept))
  new = jax.device_put(merged, shardings.params)
  with sharding.activate(mesh, rules):
    opt_state = jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(new)
  return state.replace(params=new, opt_state=opt_state)
