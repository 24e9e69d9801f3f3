"""TrainState, the pure train/eval steps, and train_and_evaluate(config, workdir).

One code path for one CPU and for a pod: the steps are jitted with explicit in/out
shardings over the config's mesh and the state is donated. All randomness comes from the
config's seed: the step's key is fold_in(seed key, step), so a resumed run corrupts,
drops out and shuffles exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import objectives as objectives_lib
from bert_jax import checkpoint as checkpoint_lib
from bert_jax import memory as memory_lib
from bert_jax import metrics as metrics_lib
from bert_jax import nonfinite, optim, run_config, sharding, workdir_lock
from bert_jax.encoder import EncoderConfig
from bert_jax.model import PretrainModel
from objectives.base import SpecialIds

Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # the run's base key; each step folds in its number


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the steps close over: the model, the weighted objectives, the optimizer."""

  model: PretrainModel
  objectives: tuple[objectives_lib.WeightedObjective, ...]
  tx: optax.GradientTransformation
  grad_accum: int = 1
  nan_policy: str = "stop"  # stop | skip (drop the update of a non-finite step, count it)


NAN_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient (nan_policy="stop")."""


def special_ids(tokenizer: Any) -> SpecialIds:
  return SpecialIds(pad=tokenizer.pad_id, unk=tokenizer.unk_id, cls=tokenizer.cls_id,
                    sep=tokenizer.sep_id, mask=tokenizer.mask_id,
                    first_regular=tokenizer.first_regular_id, vocab_size=tokenizer.vocab_size)


def check_vocab(model_cfg: EncoderConfig, tokenizer_vocab: int, multiple: int = 128) -> None:
  """The model's table must hold the tokenizer's ids, padded by less than `multiple`."""
  padded = -(-tokenizer_vocab // multiple) * multiple
  if not tokenizer_vocab <= model_cfg.vocab_size <= padded:
    raise ValueError(
        f"model.vocab_size={model_cfg.vocab_size} does not match the tokenizer's vocabulary "
        f"of {tokenizer_vocab} (allowed: {tokenizer_vocab}..{padded}, i.e. padded to a "
        f"multiple of {multiple}); set --config.model.vocab_size={tokenizer_vocab} or "
        "point --config.data.tokenizer at the right model")


def static_pairs_note(kind: str, num_examples: int, examples_seen: int, dupe_factor: int,
                      max_passes: float = 4.0) -> str | None:
  """A warning when a sentence-level objective would see its pairs, drawn once, many times.

  Pairs (split points, negatives, swaps) are planned once per `data.dupe_factor` pass; on a
  small corpus a long run then learns the order of the pairs it has seen rather than a
  rule (docs/pairs.md: held-out SOP loss 0.68 -> 1.24 over 15 passes; falling with 10 draws).
  """
  if kind == "single" or num_examples <= 0:
    return None
  passes = examples_seen / num_examples
  if passes <= max_passes:
    return None
  suggested = max(dupe_factor + 1, math.ceil(dupe_factor * passes / max_passes))
  return (f"{kind.upper()} pairs are drawn once per data.dupe_factor pass "
          f"(dupe_factor={dupe_factor}, {num_examples:,} pairs) and this run reads them "
          f"{passes:.1f} times: sentence-level objectives then memorise the pairs; "
          f"--config.data.dupe_factor={suggested} draws enough for <= {max_passes:g} passes")


def build_setup(config: ml_collections.ConfigDict, special: SpecialIds,
                total_steps: int | None = None) -> Setup:
  encoder_cfg = EncoderConfig.from_dict(config.model)
  weighted = objectives_lib.build(config, special)
  model = PretrainModel(encoder_cfg, tuple(w.objective for w in weighted))
  frozen = tuple(p for w in weighted for p in w.objective.frozen_paths())
  tx = optim.make_optimizer(config.optim, total_steps or config.train.steps, frozen)
  if config.train.nan_policy not in NAN_POLICIES:
    raise ValueError(f"train.nan_policy: {config.train.nan_policy!r} is not one of "
                     f"{NAN_POLICIES}")
  for field in ("batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                "eval_batches", "keep"):
    if config.train[field] < 1:  # cadences are step moduli: 0 would divide by zero
      raise ValueError(f"train.{field} must be >= 1, got {config.train[field]}")
  if config.train.steps < 0:
    raise ValueError(f"train.steps must be >= 0, got {config.train.steps}")
  return Setup(model, weighted, tx, int(config.train.grad_accum), config.train.nan_policy)


# ----------------------------------------------------------------------------- steps


def corrupt(setup: Setup, batch: Batch, key: jax.Array) -> Batch:
  for i, w in enumerate(setup.objectives):
    batch = w.objective.corrupt(batch, jax.random.fold_in(key, i))
  return batch


def compute_loss(params: Any, setup: Setup, batch: Batch, dropout_key: jax.Array,
                 deterministic: bool) -> tuple[jax.Array, dict]:
  outputs = setup.model.apply({"params": params}, batch, deterministic=deterministic,
                              rngs={"dropout": dropout_key})
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for w in setup.objectives:
    loss, m = w.objective.loss(outputs[w.objective.name], batch)
    total = total + w.weight * loss
    metrics.update({f"{w.objective.name}/{k}": v for k, v in m.items()})
  metrics["loss"] = (total, jnp.ones((), jnp.float32))
  return total, metrics


def train_step(state: TrainState, batch: Batch, setup: Setup) -> tuple[TrainState, dict]:
  """One optimizer step (over `grad_accum` micro-batches). Pure; jitted by the caller."""
  key = jax.random.fold_in(state.rng, state.step)
  corrupt_key, dropout_key = jax.random.split(key)
  # The step, once per example so it splits with the batch into micro-batches: for losses
  # that follow a schedule (distillation's progressive layer-wise transfer).
  batch = dict(batch, step=jnp.full(batch["input_ids"].shape[:1], state.step, jnp.int32))
  batch = corrupt(setup, batch, corrupt_key)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  k = setup.grad_accum
  if k == 1:
    (_, metrics), grads = grad_fn(state.params, setup, batch, dropout_key, False)
  else:
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def body(acc, inp):
      i, mb = inp
      (_, m), g = grad_fn(state.params, setup, mb, jax.random.fold_in(dropout_key, i), False)
      return jax.tree.map(jnp.add, acc, (g, m)), None

    shapes = jax.eval_shape(lambda: grad_fn(
        state.params, setup, jax.tree.map(lambda x: x[0], micro), dropout_key, False))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (shapes[1], shapes[0][1]))
    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    grads = jax.tree.map(lambda g: g / k, grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  one = jnp.ones((), jnp.float32)
  # Checked on device, reported by the host at logging time: no host sync per step.
  finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)
  metrics["grad_norm"] = (grad_norm, one)
  metrics["nonfinite_steps"] = (jnp.where(finite, 0.0, 1.0), one)
  if setup.nan_policy == "skip":
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params: Any, batch: Batch, key: jax.Array, setup: Setup) -> dict:
  batch = corrupt(setup, batch, key)
  _, metrics = compute_loss(params, setup, batch, key, True)
  return metrics


# ----------------------------------------------------------------------------- state


def dummy_batch(batch_size: int, seq_len: int, example_kind: str) -> Batch:
  b = {
      "input_ids": np.full((batch_size, seq_len), 5, np.int32),
      "segment_ids": np.zeros((batch_size, seq_len), np.int32),
      "attention_mask": np.ones((batch_size, seq_len), np.int32),
      "word_ids": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
      "example_id": np.arange(batch_size, dtype=np.int32),
      "epoch": np.zeros((batch_size,), np.int32),
  }
  if example_kind != "single":
    b["sentence_label"] = np.zeros((batch_size,), np.int32)
  return b


def _init_boxed(setup: Setup, seed: int, batch: Batch) -> TrainState:
  rng = jax.random.PRNGKey(seed)
  init_key, state_key = jax.random.split(rng)
  batch = corrupt(setup, batch, init_key)
  variables = setup.model.init({"params": init_key, "dropout": init_key}, batch,
                               deterministic=True)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=setup.tx.init(params), rng=state_key)


def state_shardings(setup: Setup, seed: int, batch: Batch, mesh, rules):
  """(abstract unboxed state with shardings, the shardings tree)."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, setup, seed), batch)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def init_state(setup: Setup, seed: int, batch: Batch, mesh, rules) -> tuple[TrainState, Any]:
  """A freshly initialised state, created directly in its shards."""
  _, shardings = state_shardings(setup, seed, batch, mesh, rules)
  with sharding.activate(mesh, rules):
    init = jax.jit(lambda b: nn.meta.unbox(_init_boxed(setup, seed, b)),
                   out_shardings=shardings)
    state = init(batch)
  params = state.params
  for w in setup.objectives:  # e.g. load a frozen teacher, initialise a student from it
    params = w.objective.initialize(params)
  if params is not state.params:
    state = state.replace(params=jax.device_put(params, shardings.params))
  return state, shardings


def batch_spec(ds, global_batch_size: int, batch_sharding) -> Batch:
  """Shapes and dtypes of a global training batch, read from the dataset's first example
  (random access: the training iterator does not move)."""
  example = dict(ds[0], epoch=np.int32(0))
  return {k: jax.ShapeDtypeStruct((global_batch_size,) + np.shape(v), np.asarray(v).dtype,
                                  sharding=batch_sharding) for k, v in example.items()}


def to_global(batch: Batch, batch_sharding) -> Batch:
  """Per-host numpy batch -> global jax arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in batch.items()}


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- loop


@dataclasses.dataclass
class RunSummary:
  workdir: str
  steps: int
  first_eval: dict[str, float] | None
  last_eval: dict[str, float] | None
  checkpoint_dir: str
  metrics_file: str
  plot: str | None
  tokens_per_second: float
  signal: int = 0  # the signal (SIGTERM) that ended the run early after a checkpoint


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Checks the config and the workdir's; config.json is written later, by
  run_config.record_validated once the run has passed its start-up checks."""
  run_config.validate(config)
  os.makedirs(workdir, exist_ok=True)
  run_config.check_compatible(config, workdir)


def mesh_and_rules(config: ml_collections.ConfigDict):
  """The config's mesh and logical rules, after checking that grad_accum splits the batch
  (shared by pretraining and fine-tuning start-up)."""
  tc = config.train
  if tc.grad_accum < 1 or tc.batch_size % tc.grad_accum:
    raise ValueError(f"train.batch_size={tc.batch_size} must be a multiple of "
                     f"train.grad_accum={tc.grad_accum}")
  return sharding.make_mesh(config.mesh), sharding.logical_rules(config.sharding)


@workdir_lock.holding_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> RunSummary:
  """Pretrain with the config's objectives; resumes if `workdir` holds a checkpoint.

  `stop_after` ends this invocation after that step with a checkpoint, as a preemption
  would; launching again continues the same run (same schedule, data order and masks).
  """
  from bert_jax.data import pipeline, tokenizer as tokenizer_lib

  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
  if (os.path.isfile(os.path.join(workdir, "hf", "config.json")) and os.path.isdir(ckpt_dir)
      and sorted(os.listdir(ckpt_dir)) == ["0"]):
    # launch.import_hf's step 0 holds parameters only; restoring it as a train state would
    # fail and move it aside as damaged.
    raise ValueError(
        f"{workdir} holds a checkpoint imported from Hugging Face (parameters, no optimizer "
        "state): fine-tune it (launch.finetune --config.init=WORKDIR), use it as a "
        "distillation teacher or export it; pretraining cannot continue in that workdir.")
  prepare_workdir(config, workdir)
  tc = config.train
  mesh, rules = mesh_and_rules(config)
  divisor = sharding.batch_divisor(mesh, rules)
  if (tc.batch_size // tc.grad_accum) % divisor or tc.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={tc.batch_size} (per micro-batch "
                     f"{tc.batch_size // tc.grad_accum}) must be divisible by the {divisor} "
                     f"devices of the data axes of mesh {dict(mesh.shape)}")

  tokenizer = tokenizer_lib.ensure_tokenizer(config.data, workdir)
  run_config.check_tokenizer(workdir, tokenizer)
  special = special_ids(tokenizer)
  setup = build_setup(config, special)
  check_vocab(setup.model.encoder_config, tokenizer.vocab_size)
  if config.data.seq_len > setup.model.encoder_config.max_position_embeddings:
    raise ValueError(f"data.seq_len={config.data.seq_len} exceeds "
                     f"model.max_position_embeddings="
                     f"{setup.model.encoder_config.max_position_embeddings}")
  kind = objectives_lib.example_kind(setup.objectives)

  train_ds = pipeline.build_dataset(config.data, tokenizer, "train", seed=config.seed,
                                    example_kind=kind, workdir=workdir,
                                    global_batch_size=tc.batch_size)
  eval_ds = pipeline.build_dataset(config.data, tokenizer, "eval", seed=config.seed + 1,
                                   example_kind=kind, workdir=workdir)
  per_host = tc.batch_size // jax.process_count()
  data_iter = pipeline.train_iterator(
      train_ds, batch_size_per_host=per_host, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads)
  eval_data = pipeline.eval_batches(eval_ds, batch_size=per_host, num_batches=tc.eval_batches,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())

  batch_sharding = sharding.batch_sharding(mesh, rules)
  sample = dummy_batch(tc.batch_size, config.data.seq_len, kind)
  abstract, shardings = state_shardings(setup, config.seed, sample, mesh, rules)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=tc.keep, keep_best=tc.keep_best,
                                     async_save=tc.async_checkpoint)
  with sharding.activate(mesh, rules):
    # Compiled from shapes alone, before any state exists, so that a step that cannot fit
    # in device memory is refused with the figures instead of failing mid-allocation.
    p_train = jax.jit(functools.partial(train_step, setup=setup),
                      in_shardings=(shardings, batch_sharding),
                      out_shardings=(shardings, None), donate_argnums=(0,)).lower(
                          abstract, batch_spec(train_ds, tc.batch_size, batch_sharding)
                      ).compile()
    p_eval = jax.jit(functools.partial(eval_step, setup=setup))
  memory = memory_lib.report_memory(p_train, mesh)
  memory_lib.check_fits(memory, jax.local_devices()[0])
  run_config.record_validated(config, workdir, tokenizer)

  restored = ckpt.restore_latest_good(
      abstract, data_iter, restart_if_unreadable=bool(tc.get("restart_if_unreadable")))
  if restored is not None:
    state, start = restored
    logging.info("resumed from step %d", start)
  else:
    state, _ = init_state(setup, config.seed, sample, mesh, rules)
    start = 0
  n_params = count_params(state.params)
  n_encoder = count_params(state.params["encoder"])

  eval_base = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)

  def evaluate(params) -> dict[str, float]:
    with sharding.activate(mesh, rules):
      ms = [p_eval(params, to_global(with_epoch(b), batch_sharding),
                   jax.random.fold_in(eval_base, i)) for i, b in enumerate(eval_data)]
    return metrics_lib.reduce_metrics(ms)

  writer = metrics_lib.MetricWriter(workdir)
  tokens_per_step = tc.batch_size * config.data.seq_len
  progress = metrics_lib.Progress(tc.steps, start, tokens_per_step)
  progress.write(f"model: {n_params:,} parameters ({n_encoder:,} in the encoder); "
                 f"objectives {config.objectives}; mesh {dict(mesh.shape)}; "
                 f"{len(train_ds):,} training examples of {config.data.seq_len} tokens")
  progress.write(memory_lib.format_report(memory))
  note = static_pairs_note(kind, len(train_ds), tc.steps * tc.batch_size,
                           int(config.data.get("dupe_factor", 1) or 1))
  if note:
    progress.write(f"warning: {note}")
    logging.warning(note)
  first_eval = last_eval = None
  if start == 0 and tc.steps > 0:
    first_eval = evaluate(state.params)
    writer.write(0, "eval", first_eval)
    progress.write(_format("eval", 0, first_eval))

  pending: list[dict] = []
  rate = 0.0
  t_start = time.perf_counter()
  preempted = {"signal": 0}
  previous_handler = _on_sigterm(preempted)
  guard = nonfinite.Guard(tc, start, workdir)
  try:
    last = tc.steps if stop_after is None else min(tc.steps, stop_after)
    for step in range(start + 1, last + 1):
      batch = to_global(next(data_iter), batch_sharding)
      with sharding.activate(mesh, rules):
        state, m = p_train(state, batch)
      pending.append(m)
      if preempted["signal"] or step % tc.checkpoint_every == 0:
        _check_finite(pending, step, setup.nan_policy)
      if step % tc.log_every == 0 or step == last:
        _check_finite(pending, step, setup.nan_policy)
        values = metrics_lib.reduce_metrics(pending)
        pending = []
        rate = progress.update(step, values["loss"])
        writer.write(step, "train", dict(values, tokens_per_second=rate,
                                         learning_rate=_lr(config, step)))
        guard.update(step, values)
      if step % tc.eval_every == 0 or step == tc.steps:
        last_eval = evaluate(state.params)
        writer.write(step, "eval", last_eval)
        progress.write(_format("eval", step, last_eval))
      if step % tc.checkpoint_every == 0 or step == last or preempted["signal"]:
        _check_finite(pending, step, setup.nan_policy)
        ckpt.save(step, state, data_iter, force=bool(preempted["signal"]),
                  metrics={"eval/loss": last_eval["loss"]} if last_eval and (
                      step % tc.eval_every == 0 or step == tc.steps) else None)
      if preempted["signal"]:
        progress.write(f"received signal {preempted['signal']}: checkpointed step {step}, "
                       "exiting; relaunch the same command to resume")
        break
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    ckpt.close()
    writer.close()
  elapsed = time.perf_counter() - t_start
  done = max(tc.steps - start, 0)
  plot = metrics_lib.plot_losses(workdir) if jax.process_index() == 0 else None
  return RunSummary(
      workdir=workdir, steps=tc.steps, first_eval=first_eval, last_eval=last_eval,
      checkpoint_dir=ckpt.directory, metrics_file=writer.path, plot=plot,
      tokens_per_second=done * tokens_per_step / elapsed if elapsed > 0 else 0.0,
      signal=preempted["signal"])


def _on_sigterm(flag: dict):
  """SIGTERM (preemption) sets a flag; the loop checkpoints after the current step."""
  def handler(signum, frame):
    del frame
    flag["signal"] = signum
  try:
    return signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    return signal.getsignal(signal.SIGTERM)


def _check_finite(pending: list[dict], step: int, policy: str) -> None:
  """Raises NonFiniteError naming the first bad step and objective (policy "stop")."""
  if policy != "stop" or not pending:
    return
  flags = jax.device_get([m["nonfinite_steps"][0] for m in pending])
  bad = [i for i, f in enumerate(flags) if f > 0]
  if not bad:
    return
  m = jax.device_get(pending[bad[0]])
  losses = {k[:-len("/loss")]: float(v[0]) / max(float(v[1]), 1.0)
            for k, v in m.items() if k.endswith("/loss")}
  culprits = [k for k, v in losses.items() if not np.isfinite(v)] or ["gradient"]
  raise NonFiniteError(
      f"non-finite loss or gradient at step {step - len(pending) + 1 + bad[0]} "
      f"(from {', '.join(culprits)}; losses {losses}); the last checkpoint is untouched. "
      "Lower the learning rate, or set --config.train.nan_policy=skip to drop such updates.")


def with_epoch(batch: Batch) -> Batch:
  if "epoch" not in batch:
    batch = dict(batch, epoch=np.zeros(batch["input_ids"].shape[:1], np.int32))
  return batch


def _lr(config: ml_collections.ConfigDict, step: int) -> float:
  return float(optim.learning_rate(config.optim, config.train.steps)(step - 1))


def _format(split: str, step: int, values: dict[str, float]) -> str:
  keys = [k for k in sorted(values) if k == "loss" or k.endswith(("loss", "accuracy"))]
  return f"[{split} @ step {step}] " + ", ".join(f"{k}={values[k]:.4f}" for k in keys)
