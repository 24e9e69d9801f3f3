"""Where a fine-tuning run starts: the encoder (and tokenizer) of a pretraining workdir.

`config.init` names a workdir of ours (any objective; for ELECTRA the discriminator and
for distillation the student are what live at params["encoder"]) or one written by
`launch.import_hf`. Its config.json gives the architecture, its checkpoint (latest, best
or a given step) the weights; only params["encoder"] is kept (plus, for the kinds that
read the pooled [CLS], the pooler an objective of the run declares in `pooler_path()`,
e.g. the NSP/SOP head's, or that of an imported model, with `config.init_pooler`): the pretraining heads are dropped. `config.init = ""` starts from
random weights with the architecture of the configs/pretrain.py preset `config.arch`;
`config.init_weights = False` keeps init's architecture and tokenizer but not its weights
(the baseline a pretrained model is compared with).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import run_config
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.encoder import EncoderConfig

# EncoderConfig fields a fine-tuning run may change (config.model.*); None keeps init's.
OVERRIDABLE = ("hidden_dropout", "attention_dropout", "dtype", "remat", "attention_impl")
# Where a pooler lives when no objective of the run declares one (`pooler_path`): an
# imported model's lone pooler, a fine-tuned workdir's task head.
POOLER_FALLBACKS = (("pooler",), ("task", "pooler"))
# Written by fine-tuning runs: the encoder's full EncoderConfig (their config.json holds
# only the fields fine-tuning may change), so a fine-tuned workdir can be an init too.
ENCODER_CONFIG_FILE = "encoder_config.json"
BEST_DIR = "best"  # a fine-tuned workdir's best dev checkpoint (bert_jax.finetune.loop)


@dataclasses.dataclass
class Init:
  encoder_config: EncoderConfig
  tokenizer: tokenizer_lib.Tokenizer
  tokenizer_path: str
  encoder_params: Any | None  # None: random
  pooler_params: Any | None
  step: int | None
  description: str


def workdir_tokenizer_path(workdir: str, pre: ml_collections.ConfigDict | None) -> str:
  """The tokenizer a workdir was trained with: the one saved in it, else its config's
  data.tokenizer."""
  in_workdir = tokenizer_lib.workdir_tokenizer(workdir)
  if in_workdir is not None:
    return str(in_workdir)
  configured = pre.data.get("tokenizer") if pre is not None and "data" in pre else ""
  if configured:
    return configured
  raise ValueError(f"{workdir!r} has no {tokenizer_lib.MODEL_FILENAME} or tokenizer.json "
                   "and its config names no data.tokenizer: give one with --config.tokenizer")


def _tokenizer_path(config: ml_collections.ConfigDict, workdir: str | None,
                    pre: ml_collections.ConfigDict | None) -> str:
  if config.tokenizer:
    return config.tokenizer
  if workdir:
    return workdir_tokenizer_path(workdir, pre)
  raise ValueError("config.init='' (random init) needs a tokenizer: --config.tokenizer=PATH "
                   "(a sentencepiece .model or a tokenizer.json)")


def _with_overrides(fields: dict[str, Any], config: ml_collections.ConfigDict) -> EncoderConfig:
  fields = dict(fields)
  for name in OVERRIDABLE:
    value = config.model.get(name)
    if value is not None:
      fields[name] = value
  return EncoderConfig.from_dict(fields)


def check_compatible(cfg: EncoderConfig, tokenizer_vocab: int, seq_len: int,
                     origin: str) -> None:
  """The checkpoint's tables must hold the tokenizer's ids and the task's positions."""
  if tokenizer_vocab > cfg.vocab_size:
    raise ValueError(
        f"vocabulary mismatch: the tokenizer has {tokenizer_vocab} ids but {origin} has a "
        f"word-embedding table of {cfg.vocab_size} (model.vocab_size); fine-tune with the "
        "tokenizer the model was pretrained with (--config.tokenizer)")
  padded = -(-tokenizer_vocab // 128) * 128
  if cfg.vocab_size > padded:
    raise ValueError(
        f"vocabulary mismatch: {origin} has {cfg.vocab_size} word embeddings, more than the "
        f"tokenizer's {tokenizer_vocab} padded to a multiple of 128 ({padded}): this is not "
        "the tokenizer the model was pretrained with (--config.tokenizer)")
  usable = cfg.max_position_embeddings - cfg.position_offset
  if seq_len > usable:
    raise ValueError(
        f"data.seq_len={seq_len} is longer than the position table of {origin} "
        f"({cfg.max_position_embeddings} positions"
        f"{f', offset {cfg.position_offset}' if cfg.position_offset else ''}: at most "
        f"{usable} tokens); lower --config.data.seq_len")


def pooler_paths(pre: ml_collections.ConfigDict) -> list[tuple[str, ...]]:
  """Where to look for a pooler: the `pooler_path` of each objective the pretraining run
  (its saved config) trained, then POOLER_FALLBACKS."""
  import objectives
  spec = pre.get("objectives") or ""  # a fine-tuned workdir's config names none
  known = set(objectives.available())
  names = [n for n, _ in objectives.parse_spec(spec) if n in known] if spec else []
  declared = [objectives.get(n).pooler_path() for n in names]
  return [p for p in declared if p] + list(POOLER_FALLBACKS)


def _subtree(params: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(params, dict) or key not in params:
      return None
    params = params[key]
  return params if isinstance(params, dict) else None


def load_init(config: ml_collections.ConfigDict) -> Init:
  workdir = os.path.abspath(config.init) if config.init else None
  pre = None
  from_best = False
  if workdir and not os.path.isfile(os.path.join(workdir, run_config.CONFIG_FILE)):
    parent = os.path.dirname(workdir)
    if (os.path.basename(workdir) == BEST_DIR
        and os.path.isfile(os.path.join(parent, ENCODER_CONFIG_FILE))):
      workdir, from_best = parent, True  # FT/best: a fine-tuned run's best checkpoint
  if workdir:
    if not os.path.isfile(os.path.join(workdir, run_config.CONFIG_FILE)):
      raise FileNotFoundError(f"config.init={config.init!r} is not a bert-jax workdir (no "
                              f"{run_config.CONFIG_FILE}); import a Hugging Face model first "
                              "with `python -m launch.import_hf`")
    pre = run_config.load(workdir)
    encoder_file = os.path.join(workdir, ENCODER_CONFIG_FILE)
    if os.path.isfile(encoder_file):  # a fine-tuning workdir: continue from its encoder
      with open(encoder_file) as f:
        fields = json.load(f)
    else:
      fields = pre.model.to_dict()
    origin = f"the checkpoint in {workdir}"
  else:
    from configs import pretrain
    fields = pretrain.get_config(config.arch).model.to_dict()
    origin = f"the {config.arch!r} architecture"
  tok_path = _tokenizer_path(config, workdir, pre)
  tok = tokenizer_lib.load_tokenizer(tok_path)
  if not workdir:
    fields["vocab_size"] = tok.vocab_size
  cfg = _with_overrides(fields, config)
  check_compatible(cfg, tok.vocab_size, int(config.data.seq_len), origin)
  encoder = pooler = step = None
  if workdir and config.init_weights:
    want = None if config.init_step < 0 else int(config.init_step)
    # Two-stage fine-tuning: a fine-tuned workdir's best dev checkpoint is in its best/.
    best_dir = os.path.join(workdir, BEST_DIR)
    if (os.path.isfile(os.path.join(workdir, ENCODER_CONFIG_FILE)) and os.path.isdir(best_dir)
        and (from_best or config.init_which == "best")):
      params, step = checkpoint_lib.restore_params(best_dir, want, "latest")
    else:
      params, step = checkpoint_lib.restore_params(workdir, want, config.init_which)
    if "encoder" not in params:
      raise ValueError(f"the checkpoint of {workdir} has no 'encoder' parameters "
                       f"(it has {sorted(params)})")
    encoder = jax.tree.map(np.asarray, params["encoder"])
    for path in pooler_paths(pre):
      node = _subtree(params, path)
      if node:
        pooler = jax.tree.map(np.asarray, node)
        break
    description = f"{workdir} step {step} ({config.init_which if want is None else 'given'})"
  elif workdir:
    description = f"random weights, architecture and tokenizer of {workdir}"
  else:
    description = f"random weights, architecture {config.arch!r}"
  return Init(cfg, tok, tok_path, encoder, pooler, step, description)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_same_structure(restored: Any, expected: Any, what: str) -> None:
  """Names and shapes of the restored tree must be the model's, else a clear error."""
  got, want = _flat(restored), _flat(expected)
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(want[k].shape)}"
         for k in sorted(set(got) & set(want)) if tuple(got[k].shape) != tuple(want[k].shape)]
  if missing or extra or bad:
    parts = []
    if missing:
      parts.append(f"missing {missing[:5]}")
    if extra:
      parts.append(f"unexpected {extra[:5]}")
    if bad:
      parts.append("shape mismatch " + "; ".join(bad[:5]))
    raise ValueError(f"{what} does not fit the model built from its config: "
                     + ", ".join(parts))
