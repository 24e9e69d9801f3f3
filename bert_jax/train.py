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
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import objectives as objectives_lib
from bert_jax import checkpoint as checkpoint_lib
from bert_jax import continued
from bert_jax import memory as memory_lib
from bert_jax import metrics as metrics_lib
from bert_jax import nonfinite, optim, run_config, sharding, workdir_lock
from bert_jax import tricks as tricks_lib
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
  objectives: objectives_lib.Composition
  tx: optax.GradientTransformation
  grad_accum: int = 1
  nan_policy: str = "stop"  # stop | skip (drop the update of a non-finite step, count it)
  tricks: tricks_lib.Tricks = tricks_lib.Tricks()  # adversarial, freezing, mixout, averaging

  def eval_params(self, state: "TrainState") -> Any:
    """The weights evaluation uses: the EMA/SWA average when one is kept."""
    return self.tricks.eval_params(state.params, state.opt_state)


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
  model = PretrainModel(encoder_cfg, weighted)
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
  """The clean batch -> {"clean", "views", "own"}: each view and objective corrupts on a
  key folded with its own name (objectives.Composition)."""
  return setup.objectives.corrupt(batch, key)


def compute_loss(params: Any, setup: Setup, batch: Batch, dropout_key: jax.Array,
                 deterministic: bool) -> tuple[jax.Array, dict]:
  outputs = setup.model.apply({"params": params}, batch, deterministic=deterministic,
                              rngs={"dropout": dropout_key})
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for w in setup.objectives:
    loss, m = w.objective.loss(outputs[w.objective.name], setup.objectives.inputs(batch, w.objective))
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

  def grad_fn(mb, key):  # ((loss, metrics), grads) of one micro-batch, with the tricks
    loss_fn = lambda params, k: compute_loss(params, setup, mb, k, False)  # noqa: E731
    return setup.tricks.grad_fn(loss_fn, state.opt_state)(state.params, key)

  k = setup.grad_accum
  if k == 1:
    (_, metrics), grads = grad_fn(batch, dropout_key)
  else:
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def body(acc, inp):
      i, mb = inp
      (_, m), g = grad_fn(mb, jax.random.fold_in(dropout_key, i))
      return jax.tree.map(jnp.add, acc, (g, m)), None

    shapes = jax.eval_shape(lambda: grad_fn(jax.tree.map(lambda x: x[0], micro), dropout_key))
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


@dataclasses.dataclass(frozen=True)
class RunKind:
  """What one kind of run (pretraining, fine-tuning) gives the shared loop, `run`.

  Everything else (mesh and batch checks, the ahead-of-time compiled step and its memory
  check, restoring the newest good checkpoint or initialising, the step loop with its NaN
  policy, logging, evaluation and checkpoint cadences and the SIGTERM checkpoint, closing)
  is `run`'s, the same for both.
  """

  setup: Setup
  steps: int  # the run's last step (the schedule's length)
  sample: Batch  # a batch of the init shapes (host numpy)
  train_spec: Callable[[Any], Batch]  # batch sharding -> ShapeDtypeStructs of the largest
  #                                     training batch: what is compiled ahead of time
  next_batch: Callable[[int], Batch]  # step (1-based, in order) -> its host training batch
  # Saved in and restored from each checkpoint (grain's iterator, in place); None: the
  # batches are a function of the step alone, which the state holds.
  data_iterator: Any
  initial_state: Callable[[], TrainState]  # a fresh state (a new run)
  evaluate: Callable[[Any], dict[str, float]]  # params -> scores
  eval_every: int
  tokens_per_step: int
  lr: Callable[[int], float]  # step -> learning rate of that step
  header: Callable[[TrainState, dict], list[str]]  # (state, memory report) -> lines
  checkpoint_every: int | None = None  # None: at evaluations (and at the end)
  checkpoint: bool = True  # False: never write checkpoints
  keep: int = 1
  keep_best: bool = False  # also keep the best checkpoint by eval loss
  async_checkpoint: bool = False
  eval_at_start: bool = False  # evaluate the initial state of a new run (step 0)
  # After each evaluation (before the checkpoint of that step): True stops the run there.
  after_eval: Callable[[int, TrainState, dict], bool] = lambda step, state, scores: False
  format_eval: Callable[[int, dict], str] | None = None
  # The run's own bookkeeping, a JSON dict saved with each checkpoint and updated in place
  # from the restored one (exact resume); None: none.
  progress: dict | None = None
  restore_progress: Callable[[dict | None], None] | None = None  # after a restore
  stopped: Callable[[], bool] = lambda: False  # a restored run that had already ended
  quiet: bool = False
  close: Callable[[], None] = lambda: None
  tokenizer: Any = None  # its fingerprint is recorded with config.json once validated


@dataclasses.dataclass
class LoopResult:
  start: int  # the step this invocation started from
  last_step: int  # the last step it ran (start when it ran none)
  first_eval: dict[str, float] | None
  last_eval: dict[str, float] | None
  checkpoint_dir: str
  metrics_file: str
  elapsed_s: float  # of the step loop
  signal: int = 0  # the signal (SIGTERM) that ended this invocation after a checkpoint


@workdir_lock.holding_workdir
def run(config: ml_collections.ConfigDict, workdir: str,
        make_kind: Callable[..., RunKind], stop_after: int | None = None) -> LoopResult:
  """The one training loop: `make_kind(config, workdir, mesh, rules)` says what is trained
  on what; resumes from the newest readable checkpoint in `workdir`.

  `stop_after` ends this invocation after that step with a checkpoint, as a preemption
  would; launching again continues the same run (same schedule, data order and masks).
  """
  workdir = os.path.abspath(workdir)
  prepare_workdir(config, workdir)
  mesh, rules = mesh_and_rules(config)
  kind = make_kind(config, workdir, mesh, rules)
  setup = kind.setup
  batch_sharding = sharding.batch_sharding(mesh, rules)
  abstract, shardings = state_shardings(setup, config.seed, kind.sample, mesh, rules)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=kind.keep, keep_best=kind.keep_best,
                                     async_save=kind.async_checkpoint)
  try:
    with sharding.activate(mesh, rules):
      # Compiled from shapes alone, before any state exists, so that a step that cannot fit
      # in device memory is refused with the figures instead of failing mid-allocation.
      jitted = jax.jit(functools.partial(train_step, setup=setup),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=(0,))
      spec = kind.train_spec(batch_sharding)
      compiled = jitted.lower(abstract, spec).compile()
    memory = memory_lib.report_memory(compiled, mesh)
    memory_lib.check_fits(memory, jax.local_devices()[0])
    run_config.record_validated(config, workdir, kind.tokenizer)
    spec_shapes = {k: (v.shape, v.dtype) for k, v in spec.items()}

    def p_train(state, batch):  # other shapes (dynamic padding): compiled when first seen
      same = {k: (v.shape, v.dtype) for k, v in batch.items()} == spec_shapes
      with sharding.activate(mesh, rules):
        return compiled(state, batch) if same else jitted(state, batch)

    restored = ckpt.restore_latest_good(
        abstract, kind.data_iterator, with_progress=kind.progress is not None,
        restart_if_unreadable=bool(config.train.get("restart_if_unreadable", False)))
    if restored is not None:
      state, start = restored[0], restored[1]
      if kind.restore_progress is not None:
        kind.restore_progress(restored[2])
      logging.info("resumed from step %d", start)
    else:
      state, start = kind.initial_state(), 0
  except BaseException:
    ckpt.close()
    kind.close()
    raise

  def evaluate(params) -> dict[str, float]:
    with sharding.activate(mesh, rules):
      return kind.evaluate(params)

  format_eval = kind.format_eval or (lambda step, values: _format("eval", step, values))
  writer = metrics_lib.MetricWriter(workdir)
  progress = metrics_lib.Progress(kind.steps, start, kind.tokens_per_step,
                                  enabled=False if kind.quiet else None)
  for line in kind.header(state, memory):
    progress.write(line)
  first_eval = last_eval = None
  pending: list[dict] = []
  nan_policy = setup.nan_policy
  step = start
  t_start = time.perf_counter()
  preempted = {"signal": 0}
  previous_handler = _on_sigterm(preempted)
  guard = nonfinite.Guard(config.train, start, workdir)
  try:
    if start == 0 and kind.steps > 0 and kind.eval_at_start:
      first_eval = evaluate(setup.eval_params(state))
      writer.write(0, "eval", first_eval)
      progress.write(format_eval(0, first_eval))
    last = kind.steps if stop_after is None else min(kind.steps, stop_after)
    every = kind.checkpoint_every or kind.eval_every
    stop = kind.stopped()
    for step in range(start + 1, last + 1) if not stop else ():
      state, m = p_train(state, to_global(kind.next_batch(step), batch_sharding))
      pending.append(m)
      if preempted["signal"] or step % every == 0:
        _check_finite(pending, step, nan_policy)
      evaluating = step % kind.eval_every == 0 or step == kind.steps
      if evaluating:  # no evaluation (nor best checkpoint) of a poisoned state
        _check_finite(pending, step, nan_policy)
      if step % config.train.log_every == 0 or step == last:
        _check_finite(pending, step, nan_policy)
        values = metrics_lib.reduce_metrics(pending)
        pending = []
        rate = progress.update(step, values["loss"])
        writer.write(step, "train", dict(values, tokens_per_second=rate,
                                         learning_rate=kind.lr(step)))
        guard.update(step, values)
      if evaluating:
        last_eval = evaluate(setup.eval_params(state))
        writer.write(step, "eval", last_eval)
        stop = kind.after_eval(step, state, last_eval)
        progress.write(format_eval(step, last_eval))
      if kind.checkpoint and (step % every == 0 or step == last or stop
                              or preempted["signal"]):
        _check_finite(pending, step, nan_policy)
        ckpt.save(step, state, kind.data_iterator, force=bool(preempted["signal"]) or stop,
                  # Only an eval of this very step ranks it: never a stale one.
                  metrics={"eval/loss": last_eval["loss"]}
                  if kind.keep_best and last_eval and evaluating else None,
                  progress=dict(kind.progress) if kind.progress is not None else None)
      if preempted["signal"]:
        progress.write(f"received signal {preempted['signal']}: "
                       + (f"checkpointed step {step}" if kind.checkpoint
                          else f"stopped at step {step} (checkpoints are off)")
                       + ", exiting; relaunch the same command to resume")
        break
      if stop:
        break
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    try:
      ckpt.close()
    finally:
      kind.close()
      writer.close()
  return LoopResult(start=start, last_step=step, first_eval=first_eval, last_eval=last_eval,
                    checkpoint_dir=ckpt.directory, metrics_file=writer.path,
                    elapsed_s=time.perf_counter() - t_start, signal=preempted["signal"])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> RunSummary:
  """Pretrain with the config's objectives; resumes if `workdir` holds a checkpoint.

  `stop_after` ends this invocation after that step with a checkpoint, as a preemption
  would; launching again continues the same run (same schedule, data order and masks).
  """
  workdir = os.path.abspath(workdir)
  ckpt_dir = os.path.join(workdir, checkpoint_lib.CHECKPOINT_DIR)
  if (os.path.isfile(os.path.join(workdir, "hf", "config.json")) and os.path.isdir(ckpt_dir)
      and sorted(os.listdir(ckpt_dir)) == ["0"]):
    # launch.import_hf's step 0 holds parameters only; restoring it as a train state would
    # fail and move it aside as damaged.
    raise ValueError(
        f"{workdir} holds a checkpoint imported from Hugging Face (parameters, no optimizer "
        "state): fine-tune it (launch.finetune --config.init=WORKDIR), use it as a "
        "distillation teacher or export it; pretraining cannot continue in that workdir. "
        f"To pretrain it further, start a new run from it: --config.init_from={workdir} "
        "--workdir=NEW.")
  config = objectives_lib.complete_config(continued.apply_init_from(config))
  result = run(config, workdir, pretraining, stop_after)
  tc = config.train
  done = max(tc.steps - result.start, 0)
  plot = metrics_lib.plot_losses(workdir) if jax.process_index() == 0 else None
  elapsed = result.elapsed_s
  return RunSummary(
      workdir=workdir, steps=tc.steps, first_eval=result.first_eval,
      last_eval=result.last_eval, checkpoint_dir=result.checkpoint_dir,
      metrics_file=result.metrics_file, plot=plot,
      tokens_per_second=(done * tc.batch_size * config.data.seq_len / elapsed
                         if elapsed > 0 else 0.0), signal=result.signal)


def pretraining(config: ml_collections.ConfigDict, workdir: str, mesh, rules) -> RunKind:
  """Pretraining as a RunKind: the config's objectives on the corpus's packed examples,
  batches from grain's iterator (saved with each checkpoint)."""
  from bert_jax.data import pipeline, tokenizer as tokenizer_lib

  tc = config.train
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
  example_kind = objectives_lib.example_kind(setup.objectives)
  kind = example_kind.name

  train_ds = pipeline.build_dataset(config.data, tokenizer, "train", seed=config.seed,
                                    example_kind=example_kind, workdir=workdir,
                                    global_batch_size=tc.batch_size)
  per_host = tc.batch_size // jax.process_count()
  data_iter = pipeline.train_iterator(
      train_ds, batch_size_per_host=per_host, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads)
  evaluate, _ = held_out_evaluation(config, setup, tokenizer, workdir, mesh, rules)
  sample = dummy_batch(tc.batch_size, config.data.seq_len, kind)

  def header(state, memory) -> list[str]:
    n_params = count_params(state.params)
    n_encoder = count_params(state.params["encoder"])
    lines = [f"model: {n_params:,} parameters ({n_encoder:,} in the encoder); "
             f"objectives {config.objectives}; mesh {dict(mesh.shape)}; "
             f"{len(train_ds):,} training examples of {config.data.seq_len} tokens",
             memory_lib.format_report(memory)]
    note = static_pairs_note(kind, len(train_ds), tc.steps * tc.batch_size,
                             int(config.data.get("dupe_factor", 1) or 1))
    if note:
      lines.append(f"warning: {note}")
      logging.warning(note)
    return lines

  def initial_state() -> TrainState:
    state, shardings = init_state(setup, config.seed, sample, mesh, rules)
    if config.get("init_from"):
      state = continued.load_matching(state, shardings, setup, config, mesh, rules)
    return state

  return RunKind(
      setup=setup, steps=int(tc.steps), sample=sample,
      train_spec=lambda bs: batch_spec(train_ds, tc.batch_size, bs),
      next_batch=lambda step: next(data_iter), data_iterator=data_iter,
      initial_state=initial_state, evaluate=evaluate, eval_every=int(tc.eval_every),
      tokens_per_step=tc.batch_size * config.data.seq_len,
      lr=lambda step: _lr(config, step), header=header,
      checkpoint_every=int(tc.checkpoint_every), keep=tc.keep, keep_best=tc.keep_best,
      async_checkpoint=tc.async_checkpoint, eval_at_start=True, tokenizer=tokenizer)


def held_out_evaluation(config: ml_collections.ConfigDict, setup: Setup, tokenizer: Any,
                        workdir: str, mesh, rules
                        ) -> tuple[Callable[[Any], dict[str, float]], list[Batch]]:
  """(params -> held-out scores, the host batches scored): the first train.eval_batches
  batches of the eval split, each corrupted on its own fixed key, so every evaluation of a
  run (and `evaluate_checkpoint` after it) scores the same examples the same way."""
  from bert_jax.data import pipeline

  eval_ds = pipeline.build_dataset(config.data, tokenizer, "eval", seed=config.seed + 1,
                                   example_kind=objectives_lib.example_kind(setup.objectives),
                                   workdir=workdir)
  eval_data = pipeline.eval_batches(
      eval_ds, batch_size=config.train.batch_size // jax.process_count(),
      num_batches=config.train.eval_batches, process_index=jax.process_index(),
      process_count=jax.process_count())
  batch_sharding = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    p_eval = jax.jit(functools.partial(eval_step, setup=setup))
  eval_base = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0xE7A1)

  def evaluate(params) -> dict[str, float]:
    ms = [p_eval(params, to_global(with_epoch(b), batch_sharding),
                 jax.random.fold_in(eval_base, i)) for i, b in enumerate(eval_data)]
    return metrics_lib.reduce_metrics(ms)
  return evaluate, eval_data


def evaluate_checkpoint(workdir: str, step: int | None = None, which: str = "latest",
                        eval_batches: int | None = None,
                        dupe_factor: int | None = None
                        ) -> tuple[int, dict[str, float], list[str]]:
  """(step, held-out scores, lines describing the examples scored) of a pretraining
  workdir's checkpoint, as its run evaluates, over `eval_batches` batches (default: the
  run's). `dupe_factor` draws the held-out examples that many times from the held-out
  text (sentence-level objectives: a small split gives few pairs, so its accuracy is
  noisy; the description's label_fractions, of the examples scored, give their chance
  level). With the run's settings, the scores are the run's own evaluation at that step.
  The training split is not built."""
  from bert_jax.data import tokenizer as tokenizer_lib
  if os.path.isfile(os.path.join(workdir, continued.ENCODER_CONFIG_FILE)):
    raise ValueError(f"{workdir!r} is a fine-tuning workdir; `launch.predict` scores those")
  config = run_config.load(workdir)
  if eval_batches is not None:
    config.train.eval_batches = int(eval_batches)
  if dupe_factor is not None:
    config.data.dupe_factor = int(dupe_factor)
  config = objectives_lib.complete_config(config)
  tokenizer = tokenizer_lib.ensure_tokenizer(config.data, workdir)
  setup = build_setup(config, special_ids(tokenizer))
  mesh, rules = mesh_and_rules(config)
  evaluate, scored = held_out_evaluation(config, setup, tokenizer, workdir, mesh, rules)
  params, restored = checkpoint_lib.restore_params(workdir, step, which)
  n = sum(len(b["input_ids"]) for b in scored)
  lines = [f"[eval] {n:,} examples scored ({len(scored)} batches of the eval split)"]
  if "sentence_label" in scored[0]:
    labels = np.concatenate([b["sentence_label"] for b in scored])
    lines.append("[eval] label_fractions=" + ",".join(
        f"{x:.3f}" for x in np.bincount(labels) / len(labels)))
  return restored, evaluate(jax.tree.map(np.asarray, params)), lines


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
