"""Compressing a fine-tuned workdir: read it, score a model on its dev set, write the result.

A compressed workdir has a fine-tuned workdir's layout, so what reads those reads it:
config.json (the fine-tuning config), encoder_config.json (the compressed architecture:
fewer layers, `pruned_heads`), the tokenizer, labels.json, the parameters {"encoder",
"task"} at checkpoints/<step> and best/checkpoints/<step>, results.json (its dev scores
as `best`), plus compression.json (method, both dev scores, parameters, bytes). It is an
init for further fine-tuning (`--config.init=OUT`) and exports with `launch.export_hf`.
int8 workdirs also hold int8/params.npz (the int8 values and scales qwix runs; the
checkpoint then holds their dequantized float32 values, what float consumers can use).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import run_config
from bert_jax.data import tokenizer as tokenizer_lib
from bert_jax.encoder import EncoderConfig
from bert_jax.finetune import batching, loop, predictions, restore
from bert_jax.finetune.tasks import TaskObjective
from bert_jax.model import PretrainModel

COMPRESSION_FILE = "compression.json"
INT8_FILE = os.path.join("int8", "params.npz")


class CompressError(ValueError):
  """A bad method or workdir: the CLI prints the message and exits with status 2."""


@dataclasses.dataclass
class FineTuned:
  workdir: str
  config: ml_collections.ConfigDict  # the full fine-tuning config (current schema)
  cfg: EncoderConfig
  params: Any  # {"encoder", "task"} host numpy
  step: int
  tokenizer: Any
  label_names: list[str] | None
  scores: dict[str, float]  # dev scores the run recorded at its best step


def full_config(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A saved fine-tuning config on the current schema (fields it lacks at their defaults)."""
  from configs.finetune import get_config
  c = get_config("bundled")
  known = run_config.flatten(c)
  with c.unlocked():
    for key, value in run_config.flatten(saved).items():
      if key in known:
        section, _, field = key.rpartition(".")
        node = c
        for part in section.split(".") if section else []:
          node = node[part]
        node[field] = tuple(value) if isinstance(known[key], tuple) else value
  return c


def load_finetuned(workdir: str, which: str | None = None) -> FineTuned:
  """The workdir's parameters at `which` checkpoint: "best" (best/checkpoints, the best
  dev score), "latest" (checkpoints/), or None: the best where there is one."""
  if which not in (None, "best", "latest"):
    raise CompressError(f"which={which!r} is not one of ('best', 'latest')")
  workdir = os.path.abspath(workdir)
  enc_file = os.path.join(workdir, restore.ENCODER_CONFIG_FILE)
  if not (os.path.isfile(os.path.join(workdir, run_config.CONFIG_FILE))
          and os.path.isfile(enc_file)):
    raise CompressError(f"{workdir!r} is not a fine-tuned workdir (no config.json with "
                        f"{restore.ENCODER_CONFIG_FILE}): run launch.finetune first")
  config = full_config(run_config.load(workdir))
  with open(enc_file) as f:
    cfg = EncoderConfig.from_dict(json.load(f))
  best = os.path.join(workdir, loop.BEST_DIR)
  has_best = os.path.isdir(os.path.join(best, checkpoint_lib.CHECKPOINT_DIR))
  if which == "best" and not has_best:
    raise CompressError(f"{workdir!r} has no best checkpoint (no {best}/checkpoints: "
                        "fine-tuned with train.save_best=False); use the latest")
  src = best if has_best and which != "latest" else workdir
  try:
    params, step = checkpoint_lib.restore_params(src)
  except FileNotFoundError as e:
    raise CompressError(f"{workdir!r} has no checkpoint: {e}") from e
  if set(params) != {"encoder", "task"}:
    raise CompressError(f"{workdir!r} is not a fine-tuned workdir (parameters "
                        f"{sorted(params)}, expected encoder and task)")
  tok_path = tokenizer_lib.workdir_tokenizer(workdir)
  if tok_path is None:
    raise CompressError(f"{workdir!r} has no tokenizer")
  labels = None
  if os.path.isfile(os.path.join(workdir, "labels.json")):
    with open(os.path.join(workdir, "labels.json")) as f:
      labels = json.load(f)
  scores = {}
  if os.path.isfile(os.path.join(workdir, loop.RESULTS_FILE)):
    with open(os.path.join(workdir, loop.RESULTS_FILE)) as f:
      scores = json.load(f).get("best") or {}
  return FineTuned(workdir, config, cfg, jax.tree.map(np.asarray, params), step,
                   tokenizer_lib.load_tokenizer(tok_path), labels, scores)


def task_model(cfg: EncoderConfig, config, n_out: int) -> PretrainModel:
  return PretrainModel(cfg, (TaskObjective(config.task.kind, n_out,
                                           config.model.classifier_dropout),))


class TaskData:
  """The task's train and dev features, batched as the fine-tuning loop batches them."""

  def __init__(self, ft: FineTuned):
    c = ft.config
    self.config, self.pad_id = c, ft.tokenizer.pad_id
    self.train = loop.load_split(c, ft.tokenizer, "train", ft.label_names)
    self.label_names = ft.label_names or self.train.data.label_names
    self.dev = loop.load_split(c, ft.tokenizer, "dev", self.label_names)
    self.n_out = loop.num_outputs(c, self.label_names)

  def batch(self, split, idx, batch_size):
    c = self.config
    chosen = [split.feats.features[i] for i in idx]
    longest = max(batching.feature_length(f) for f in chosen)
    length = batching.bucket_length(longest, int(c.data.seq_len), c.data.pad_multiple,
                                    c.data.dynamic_padding)
    return batching.collate(chosen, length, batch_size, self.pad_id)

  def train_batches(self, n: int, batch_size: int | None = None, seed: int = 0
                    ) -> list[dict[str, np.ndarray]]:
    """`n` training batches (the epoch order of `seed`), e.g. for calibration."""
    bs = batch_size or int(self.config.train.batch_size)
    order = batching.epoch_batches(self.train.lengths, bs, seed, 0, False)
    if not order:
      raise CompressError(f"the training set has fewer than {bs} features")
    return [self.batch(self.train, idx, bs) for idx in order[:n]]

  def sample(self) -> dict[str, np.ndarray]:
    return self.train_batches(1, 2)[0]

  def dev_scores(self, apply_fn: Callable[[Any, dict], Any], params: Any
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Dev scores of `apply_fn(params, batch) -> task outputs`, as the loop computes them."""
    c, kind = self.config, self.config.task.kind
    feats = self.dev.feats.features
    outputs: list[Any] = [None] * len(feats)
    bs = int(c.train.eval_batch_size)
    run = jax.jit(apply_fn)
    for idx in batching.eval_batches(self.dev.lengths, bs, sort=c.data.dynamic_padding):
      out = jax.device_get(run(params, self.batch(self.dev, idx, bs)))
      for j, i in enumerate(idx):
        outputs[i] = predictions.feature_output(kind, out, j, self.dev.lengths[i])
    return predictions.evaluate(kind, self.dev.data.records, self.dev.feats, outputs,
                                c.task, self.label_names)


def float_apply(model) -> Callable:
  return lambda params, batch: model.apply({"params": params}, batch,
                                           deterministic=True)["task"]


def count_params(params: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_workdir(out: str, ft: FineTuned, cfg: EncoderConfig, params: Any,
                  scores: dict[str, float], rows: list[dict[str, Any]],
                  record: dict[str, Any], config: ml_collections.ConfigDict | None = None
                  ) -> None:
  """Writes the compressed model as a fine-tuned workdir (see the module docstring)."""
  os.makedirs(out, exist_ok=True)
  config = config or ft.config
  run_config.save(config, out)
  with open(os.path.join(out, restore.ENCODER_CONFIG_FILE), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
  ft.tokenizer.save(out)
  if ft.label_names:
    with open(os.path.join(out, "labels.json"), "w") as f:
      json.dump(ft.label_names, f)
  state = {"step": np.asarray(ft.step, np.int32), "params": params}
  for where in (out, os.path.join(out, loop.BEST_DIR)):
    ckpt_dir = os.path.join(where, checkpoint_lib.CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir):
      shutil.rmtree(ckpt_dir)
    ckpt = checkpoint_lib.Checkpointer(where, keep=1, keep_best=False, async_save=False)
    ckpt.save(ft.step, state, None, force=True)
    ckpt.close()
  with open(os.path.join(out, loop.PREDICTIONS_FILE), "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  summary = {"workdir": out, "task": config.task.name, "init": ft.workdir,
             "steps": ft.step, "best_step": ft.step, "best": scores, "last": scores,
             "main_metric": config.task.main_metric, "stopped_early": False,
             "predictions_file": os.path.join(out, loop.PREDICTIONS_FILE), "elapsed_s": 0.0}
  with open(os.path.join(out, loop.RESULTS_FILE), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  record = dict(record, checkpoint_bytes=dir_bytes(os.path.join(out, loop.BEST_DIR)))
  with open(os.path.join(out, COMPRESSION_FILE), "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
