"""finetune(config, workdir): the pretraining loop (`train.run`) driving a downstream task.

The task is an objective (bert_jax.finetune.tasks), so the state, its shardings, the
jitted step (with gradient accumulation and donation), the loop (NaN policy, SIGTERM
checkpoint, memory check, damaged-checkpoint recovery, exact resume) and the checkpoints
are `bert_jax.train`'s and `bert_jax.checkpoint`'s; `finetuning` is the `train.RunKind`
that says what differs. What fine-tuning adds: the encoder restored
from a pretraining run, host-side batches of dynamic length, dev scores computed on the
host from the model's outputs, the best dev checkpoint (WORKDIR/best) with its predictions
(WORKDIR/predictions_dev.jsonl), early stopping, and layer-wise learning-rate decay.
Launching the same command on an existing workdir resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from bert_jax import checkpoint as checkpoint_lib
from bert_jax import memory as memory_lib
from bert_jax import metrics as metrics_lib
from bert_jax import optim, run_config, sharding, train
from bert_jax import tricks as tricks_lib
from bert_jax.encoder import EncoderConfig
from bert_jax.finetune import batching, features as features_lib, predictions, readers
from bert_jax.finetune import restore, scores as scores_lib
from bert_jax.finetune.tasks import POOLED_KINDS, TaskObjective
from bert_jax.model import PretrainModel

import objectives as objectives_lib
from configs import finetune as configs_finetune

BEST_DIR = restore.BEST_DIR
PREDICTIONS_FILE = "predictions_dev.jsonl"
RESULTS_FILE = "results.json"
PROGRESS_FILE = "finetune_state.json"


@dataclasses.dataclass
class Summary:
  workdir: str
  task: str
  init: str
  steps: int
  best_step: int | None
  best: dict[str, float]  # dev scores at best_step
  last: dict[str, float]  # dev scores at the last evaluation
  main_metric: str
  stopped_early: bool
  predictions_file: str
  elapsed_s: float
  signal: int = 0  # the signal (SIGTERM) that ended the run early after a checkpoint


# ----------------------------------------------------------------------------- optimizer


def layer_depth(path: tuple[str, ...], cfg) -> int:
  """0 for the embeddings, l for (the module serving) layer l, L + 1 for the task head."""
  L = cfg.num_layers
  if path[0] != "encoder":
    return L + 1
  name = path[1]
  if name.startswith("layer_"):
    per = L // (cfg.num_layer_groups or L)
    return (int(name.split("_")[1]) + 1) * per
  return L if name == "final_norm" else 0


def scale_by_layer_depth(cfg, decay: float) -> optax.GradientTransformation:
  """Multiplies each update by decay^(L + 1 - depth): layer-wise learning-rate decay."""

  def update(updates, state, params=None):
    del params

    def scale(path, u):
      names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
      return u * decay ** (cfg.num_layers + 1 - layer_depth(names, cfg))

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer_config(config: ml_collections.ConfigDict, total_steps: int):
  o = ml_collections.ConfigDict(config.optim.to_dict())
  if o.warmup_steps < 0:
    o.warmup_steps = int(round(o.warmup_ratio * total_steps))
  return o


def make_tricks(config, cfg) -> tricks_lib.Tricks:
  """config.adversarial / average / freeze / mixout -> the loop's Tricks (off by default;
  a config from before these sections, e.g. an older workdir's, gets the defaults)."""
  defaults = configs_finetune.base_config()
  adv, avg, fr = (config.get(k) or defaults[k] for k in ("adversarial", "average", "freeze"))
  return tricks_lib.Tricks(
      adversarial=tricks_lib.Adversarial(adv.mode, float(adv.epsilon), int(adv.steps),
                                         float(adv.alpha)),
      frozen=tricks_lib.layer_paths(cfg, bool(fr.embeddings), int(fr.bottom_layers)),
      mixout=float(config.get("mixout", 0.0)),
      averaging=tricks_lib.Averaging(avg.mode, float(avg.decay), int(avg.start),
                                     int(avg.every)))


def make_optimizer(config, total_steps: int, cfg,
                   tricks: tricks_lib.Tricks | None = None) -> optax.GradientTransformation:
  tricks = tricks or tricks_lib.Tricks()
  tx = optim.make_optimizer(optimizer_config(config, total_steps), total_steps, tricks.frozen)
  if config.optim.layer_decay != 1.0:
    tx = optax.chain(tx, scale_by_layer_depth(cfg, float(config.optim.layer_decay)))
  return tricks.wrap_optimizer(tx)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
  data: readers.TaskData
  feats: features_lib.Featurized
  lengths: np.ndarray


def load_split(config, tok, split: str, label_names=None) -> Split:
  data = readers.read_split(config.task, split, label_names)
  feats = features_lib.featurize(config.task.kind, data.records, tok,
                                 int(config.data.seq_len), config.task)
  lengths = np.asarray([batching.feature_length(f) for f in feats.features], np.int64)
  return Split(data, feats, lengths)


def num_outputs(config, label_names) -> int:
  kind = config.task.kind
  if kind in ("classification", "tagging"):
    return len(label_names)
  return {"regression": 1, "qa": 2, "multiple_choice": int(config.task.num_choices)}[kind]


def _host_slice(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every host builds the global batch; each feeds its own rows."""
  n, p = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  per = len(batch["example_weight"]) // n
  return {k: v[p * per:(p + 1) * per] for k, v in batch.items()}


def _to_host(tree):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


# ----------------------------------------------------------------------------- state


def task_model(config: ml_collections.ConfigDict, cfg: EncoderConfig, n_out: int
               ) -> tuple[Any, Any]:
  """(model, composition): the task head on the encoder `cfg`, as training, the dev
  evaluation and prediction (bert_jax.finetune.predict) apply it; with quant.mode=qat,
  fake-quantized."""
  head = config.get("head") or configs_finetune.base_config().head
  task = TaskObjective(config.task.kind, n_out, config.model.classifier_dropout,
                       head.pooling, int(head.pool_layers), int(head.multi_sample_dropout))
  composition = objectives_lib.compose((objectives_lib.WeightedObjective(task, 1.0),))
  model = PretrainModel(cfg, composition)
  quant = config.get("quant") or {}
  if quant.get("mode", "none") not in ("none", "qat"):
    raise ValueError(f"quant.mode={quant.get('mode')!r} is not one of ('none', 'qat')")
  if quant.get("mode", "none") == "qat":  # qwix fake quantization (bert_jax.compress)
    from bert_jax.compress import quantize
    model = quantize.qat_model(model, quant.get("act", "int8"))
  return model, composition


def build(config, init: restore.Init, n_out: int, total_steps: int):
  model, composition = task_model(config, init.encoder_config, n_out)
  tricks = make_tricks(config, init.encoder_config)
  tx = make_optimizer(config, total_steps, init.encoder_config, tricks)
  policy = config.train.nan_policy
  if policy not in train.NAN_POLICIES:
    raise ValueError(f"train.nan_policy: {policy!r} is not one of {train.NAN_POLICIES}")
  return train.Setup(model, composition, tx, int(config.train.grad_accum), policy, tricks)


def dummy_batch(kind: str, n_out: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """A batch of the task's shapes (for initialisation)."""
  shape = (batch_size, n_out, seq_len) if kind == "multiple_choice" else (batch_size, seq_len)
  b = {"input_ids": np.full(shape, 5, np.int32), "segment_ids": np.zeros(shape, np.int32),
       "attention_mask": np.ones(shape, np.int32),
       "example_weight": np.ones((batch_size,), np.float32)}
  if kind == "regression":
    b["label"] = np.zeros((batch_size,), np.float32)
  elif kind in ("classification", "multiple_choice"):
    b["label"] = np.zeros((batch_size,), np.int32)
  elif kind == "tagging":
    b["token_labels"] = np.zeros((batch_size, seq_len), np.int32)
  elif kind == "qa":
    b["start_position"] = np.zeros((batch_size,), np.int32)
    b["end_position"] = np.zeros((batch_size,), np.int32)
  return b


def initial_state(config, init: restore.Init, setup, sample, mesh, rules):
  """(state, shardings): fresh task head (and fresh layers where asked), init's encoder."""
  state, shardings = train.init_state(setup, config.seed, sample, mesh, rules)
  if init.encoder_params is not None:
    state = load_pretrained(state, shardings, setup, init, config, mesh, rules)
  return state, shardings


def load_pretrained(state, shardings, setup, init: restore.Init, config, mesh, rules):
  """The freshly initialised state with init's encoder (and pooler) in place, the top
  `reinit_layers` layer modules kept at their fresh values."""
  params = dict(state.params)
  encoder = dict(init.encoder_params)
  restore.check_same_structure(encoder, params["encoder"], f"the encoder of {config.init}")
  k = int(config.reinit_layers)
  n_modules = init.encoder_config.num_layer_groups or init.encoder_config.num_layers
  if k < 0 or k > n_modules:
    raise ValueError(f"reinit_layers={k} must be in 0..{n_modules} (the layer modules)")
  for i in range(n_modules - k, n_modules):
    encoder[f"layer_{i}"] = params["encoder"][f"layer_{i}"]
  new = dict(params, encoder=jax.device_put(encoder, shardings.params["encoder"]))
  if (init.pooler_params is not None and config.init_pooler
      and config.task.kind in POOLED_KINDS and "pooler" in params["task"]):
    task_params = dict(params["task"])
    restore.check_same_structure(init.pooler_params, task_params["pooler"],
                                 f"the pooler of {config.init}")
    task_params["pooler"] = jax.device_put(init.pooler_params,
                                           shardings.params["task"]["pooler"])
    new["task"] = task_params
  with sharding.activate(mesh, rules):
    opt_state = jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(new)
  return state.replace(params=new, opt_state=opt_state)


# ----------------------------------------------------------------------------- loop


def _main_is_better(metric: str, new: float, old: float | None) -> bool:
  if old is None or (isinstance(old, float) and math.isnan(old)):
    return not math.isnan(new)
  return new < old if metric in scores_lib.LOWER_IS_BETTER else new > old


def _write_jsonl(path: str, rows) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def finetune(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
             stop_after: int | None = None) -> Summary:
  """Fine-tunes config.init (or a random init) on config.task; resumes `workdir`.

  The loop is pretraining's (`train.run`): the NaN policy, the SIGTERM checkpoint, the
  memory check, recovery from a damaged checkpoint and exact resume hold here too.
  `stop_after` ends this invocation after that step with a checkpoint (as a preemption).
  """
  t0 = time.perf_counter()
  workdir = os.path.abspath(workdir)
  made: dict[str, Any] = {}

  def make(config, workdir, mesh, rules):
    made.update(finetuning(config, workdir, mesh, rules, quiet=quiet))
    return made["kind"]

  result = train.run(config, workdir, make, stop_after)
  track = made["track"]
  summary = Summary(
      workdir=workdir, task=config.task.name, init=made["init"].description,
      steps=result.last_step, best_step=track["best_step"], best=track["best_scores"],
      last=track["last_scores"], main_metric=config.task.main_metric,
      stopped_early=track["stopped_early"],
      predictions_file=os.path.join(workdir, PREDICTIONS_FILE),
      elapsed_s=time.perf_counter() - t0, signal=result.signal)
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, RESULTS_FILE), dataclasses.asdict(summary))
  return summary


def finetuning(config: ml_collections.ConfigDict, workdir: str, mesh, rules, *,
               quiet: bool = False) -> dict[str, Any]:
  """Fine-tuning as a `train.RunKind`: {"kind", "track" (the progress it keeps: best dev
  score and step, early stopping), "init"}.

  The epoch's batches are a function of (seed, epoch) and the step of the state, so the
  data position needs no checkpoint of its own; `track` is saved with every checkpoint.
  """
  tc = config.train
  scores_lib.check_metrics(config.task)  # an unknown metric is refused before training
  divisor = sharding.batch_divisor(mesh, rules) * jax.process_count()
  for name, size in (("batch_size / grad_accum", tc.batch_size // tc.grad_accum),
                     ("eval_batch_size", tc.eval_batch_size)):
    if size % divisor:
      raise ValueError(f"train.{name}={size} must be divisible by the {divisor} devices of "
                       f"the data axes of mesh {dict(mesh.shape)}")

  init = restore.load_init(config)
  tok = init.tokenizer
  run_config.check_tokenizer(workdir, tok)
  if jax.process_index() == 0:
    tok.save(workdir)  # the fine-tuned workdir holds its tokenizer too
    _write_json(os.path.join(workdir, restore.ENCODER_CONFIG_FILE),
                init.encoder_config.to_dict())
  train_split = load_split(config, tok, "train")
  label_names = train_split.data.label_names
  dev_split = load_split(config, tok, "dev", label_names)
  if jax.process_index() == 0 and label_names:
    _write_json(os.path.join(workdir, "labels.json"), label_names)
  n_train = len(train_split.feats.features)
  steps_per_epoch = n_train // tc.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{n_train} training features are fewer than train.batch_size="
                     f"{tc.batch_size}")
  total = int(tc.steps) if tc.steps > 0 else max(1, math.ceil(tc.epochs * steps_per_epoch))
  eval_every = int(tc.eval_every) or steps_per_epoch
  kind = config.task.kind
  n_out = num_outputs(config, label_names)
  setup = build(config, init, n_out, total)
  seq_len = int(config.data.seq_len)
  pad_id = tok.pad_id
  main = config.task.main_metric

  def make_batch(feats, idx, batch_size, length=None):
    chosen = [feats[i] for i in idx]
    longest = max(batching.feature_length(f) for f in chosen)
    if length is None:
      length = batching.bucket_length(longest, seq_len, config.data.pad_multiple,
                                      config.data.dynamic_padding)
    return batching.collate(chosen, length, batch_size, pad_id)

  def train_spec(batch_sharding):
    """The largest training batch (seq_len long): what the memory check compiles."""
    b = make_batch(train_split.feats.features, range(tc.batch_size), tc.batch_size, seq_len)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
            for k, v in b.items()}

  epoch_cache: dict[int, list[np.ndarray]] = {}

  def next_batch(step: int) -> dict[str, np.ndarray]:
    epoch, within = divmod(step - 1, steps_per_epoch)
    if epoch not in epoch_cache:
      epoch_cache.clear()
      epoch_cache[epoch] = batching.epoch_batches(
          train_split.lengths, tc.batch_size, config.seed, epoch, config.data.bucket,
          config.data.bucket_batches)
    return _host_slice(make_batch(train_split.feats.features, epoch_cache[epoch][within],
                                  tc.batch_size))

  sample = dummy_batch(kind, n_out, divisor, seq_len)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    @jax.jit
    def p_predict(params, batch):
      out = setup.model.apply({"params": params}, batch, deterministic=True)["task"]
      _, m = setup.objectives[0].objective.loss(out, batch)
      return out, m

  dev_rows: list[list[dict[str, Any]]] = []  # the last evaluation's prediction rows

  def evaluate(params) -> dict[str, float]:
    feats = dev_split.feats.features
    outputs: list[Any] = [None] * len(feats)
    ms = []
    for idx in batching.eval_batches(dev_split.lengths, tc.eval_batch_size,
                                     sort=config.data.dynamic_padding):
      batch = make_batch(feats, idx, tc.eval_batch_size)
      out, m = p_predict(params, train.to_global(_host_slice(batch), batch_sharding))
      out = _to_host(out)
      ms.append(m)
      for j, i in enumerate(idx):
        outputs[i] = predictions.feature_output(kind, out, j, dev_split.lengths[i])
    scores, rows = predictions.evaluate(kind, dev_split.data.records, dev_split.feats,
                                        outputs, config.task, label_names)
    dev_rows[:] = [rows]
    return dict(scores, loss=metrics_lib.reduce_metrics(ms)["loss"])

  best_ckpt = (checkpoint_lib.Checkpointer(os.path.join(workdir, BEST_DIR), keep=1,
                                           keep_best=False, async_save=False)
               if tc.save_best else None)
  progress_path = os.path.join(workdir, PROGRESS_FILE)
  track: dict[str, Any] = {"best_step": None, "best": None, "best_scores": {},
                           "last_scores": {}, "since_best": 0, "stopped_early": False}
  improved = [False]  # by the last evaluation

  def restore_progress(saved: dict | None) -> None:
    if saved is None and os.path.exists(progress_path):  # a checkpoint from before
      with open(progress_path) as f:  # progress was saved in it
        saved = json.load(f)
    track.update(saved or {})

  def after_eval(step: int, state, scores: dict[str, float]) -> bool:
    track["last_scores"] = scores
    if main not in scores:
      raise ValueError(f"task.main_metric={main!r} is not among the dev scores "
                       f"{sorted(scores)} (task.metrics={config.task.metrics!r})")
    improved[0] = _main_is_better(main, scores[main], track["best"])
    if improved[0]:
      track.update(best=scores[main], best_step=step, best_scores=scores, since_best=0)
      if jax.process_index() == 0:
        _write_jsonl(os.path.join(workdir, PREDICTIONS_FILE), dev_rows[0])
      if best_ckpt is not None:
        for s in best_ckpt.all_steps():  # saved by a run that was cut before its checkpoint
          if s >= step:
            best_ckpt.manager.delete(s)
        best_ckpt.save(step, {"step": state.step, "params": setup.eval_params(state)}, None,
                       force=True)
    else:
      track["since_best"] += 1
      if tc.patience and track["since_best"] >= tc.patience:
        track["stopped_early"] = True
    if jax.process_index() == 0:
      _write_json(progress_path, track)
    return track["stopped_early"]

  def format_eval(step: int, scores: dict[str, float]) -> str:
    return (f"[dev @ step {step}] "
            + ", ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items()))
            + (" (best)" if improved[0] else "")
            + (" -> early stop" if track["stopped_early"] else ""))

  def header(state, memory) -> list[str]:
    return [f"fine-tuning {config.task.name} ({kind}, {n_out} outputs) from "
            f"{init.description}; {len(train_split.data.records):,} train / "
            f"{len(dev_split.data.records):,} dev examples, {total} steps "
            f"({steps_per_epoch}/epoch), mesh {dict(mesh.shape)}, "
            f"{train.count_params(state.params):,} parameters",
            memory_lib.format_report(memory)]

  lr = optim.learning_rate(optimizer_config(config, total), total)
  run_kind = train.RunKind(
      tokenizer=tok,
      setup=setup, steps=total, sample=sample, train_spec=train_spec, next_batch=next_batch,
      data_iterator=None,
      initial_state=lambda: initial_state(config, init, setup, sample, mesh, rules)[0],
      evaluate=evaluate, eval_every=eval_every, tokens_per_step=tc.batch_size * seq_len,
      lr=lambda step: float(lr(step - 1)), header=header, checkpoint_every=None,
      checkpoint=bool(tc.checkpoint), keep=1, keep_best=False, async_checkpoint=False,
      eval_at_start=False, after_eval=after_eval, format_eval=format_eval, progress=track,
      restore_progress=restore_progress, stopped=lambda: track["stopped_early"],
      quiet=quiet, close=best_ckpt.close if best_ckpt is not None else (lambda: None))
  return {"kind": run_kind, "track": track, "init": init}
