r"""Time our jitted train step, and the transformers PyTorch step beside it in the same run.

  python -m launch.benchmark --config configs/pretrain.py:bert,small --peer hf \
      [--steps 20] [--batch_size 32] [--seq_len 128] [--objective mlm] [--out bench.json] \
      [--config.model.dtype=bfloat16 ...]

Ours: `bert_jax.train.train_step` (corruption, forward, backward, AdamW, all in one jitted
function with donated state) on synthetic full-length sequences, compiled ahead of time
(the compile time is reported) and timed with `jax.block_until_ready` after every step.
Peer (`--peer hf`): transformers' `BertForPreTraining` (with NSP) or `BertForMaskedLM`
(MLM only) of the same sizes, SDPA attention, the same dropout, torch AdamW with the same
lr schedule / betas / eps / weight decay (no decay on biases and LayerNorm) and clipping,
bf16 autocast when our compute dtype is bf16, fed the batches our masking produced
(labels -100 where nothing is predicted), on the same device (cuda when torch has one).

Both run in this process, alternating blocks of `--round_steps` steps, so that a noisy
machine slows both alike; the figures are medians. MFU counts the FLOPs each step really
computes (`bert_jax.flops`): the peer and our `mlm.predict_all=True` project every position
onto the vocabulary, our default only the masked ones. Threads: torch uses os.cpu_count()
intra-op threads unless --torch_threads says otherwise; JAX keeps its default (XLA's
CPU thread pool over all cores).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

from absl import flags

from launch import config_cli, errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a program, so the module imports cleanly
  beside other launchers)."""
  config_cli.define_config("configs/pretrain.py:bert,small",
                          "Config file and preset, e.g. configs/pretrain.py:bert,small.")
  flags.DEFINE_enum("peer", "", ["", "hf"], "Also time this implementation in the same run.")
  flags.DEFINE_string("objective", "mlm", "Benchmark objective (see OBJECTIVES below).")
  flags.DEFINE_integer("steps", 20, "Timed steps per implementation (after warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation / before timing.")
  flags.DEFINE_integer("round_steps", 5, "Steps per block when alternating with the peer.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: config.train.batch_size).")
  flags.DEFINE_integer("seq_len", None, "Sequence length (default: config.data.seq_len).")
  flags.DEFINE_integer("torch_threads", None,
                       "torch intra-op threads for the peer (default: os.cpu_count()).")
  flags.DEFINE_string("out", "", "Write the results as JSON here.")


# ----------------------------------------------------------------------------- objectives


@dataclasses.dataclass(frozen=True)
class BenchObjective:
  """How to benchmark one objective: the config it needs, its FLOPs, its PyTorch peer."""

  name: str
  prepare: Callable[[Any], None]  # adjusts config.objectives (in place, config unlocked)
  step_flops: Callable[..., Any]  # (config, setup, batch_size, seq_len, *, peer) -> StepFlops
  # (config, setup, corrupted numpy batches, *, schedule_steps) -> TorchPeer
  build_peer: Callable[..., "TorchPeer"]


OBJECTIVES: dict[str, BenchObjective] = {}


def register(obj: BenchObjective) -> BenchObjective:
  OBJECTIVES[obj.name] = obj
  return obj


def _objective_names(config) -> list[str]:
  import objectives as objectives_lib
  return [n for n, _ in objectives_lib.parse_spec(config.objectives)]


def _prepare_mlm(config) -> None:
  names = _objective_names(config)
  if "mlm" not in names or not set(names) <= {"mlm", "nsp"}:
    raise ValueError(f"--objective mlm needs config.objectives to be MLM (+ NSP), got "
                     f"{config.objectives!r}")


def _mlm_flops(config, setup, batch_size: int, seq_len: int, *, peer: bool):
  from bert_jax import flops
  cfg = setup.model.encoder_config
  predict_all = peer or bool(config.mlm.predict_all)
  per_seq = seq_len if predict_all else int(config.mlm.max_predictions)
  return flops.mlm_step_flops(cfg, batch_size, seq_len, per_seq,
                              pair_head="nsp" in _objective_names(config))


register(BenchObjective("mlm", _prepare_mlm, _mlm_flops,
                        lambda *a, **k: build_hf_bert(*a, **k)))


def _prepare_electra(config) -> None:
  if _objective_names(config) != ["rtd"]:
    raise ValueError(f"--objective electra needs config.objectives='rtd:1.0' (e.g. the "
                     f"electra preset), got {config.objectives!r}")


def _rtd_objective(setup):
  return next(w.objective for w in setup.objectives if w.objective.name == "rtd")


def _generator_config(setup):
  from objectives.rtd import generator_config
  rtd = _rtd_objective(setup)
  return generator_config(setup.model.encoder_config, rtd.generator_size, rtd.generator_layers)


def _electra_flops(config, setup, batch_size: int, seq_len: int, *, peer: bool):
  from bert_jax import flops
  per_seq = seq_len if peer else int(config.rtd.max_predictions)
  return flops.electra_step_flops(setup.model.encoder_config, _generator_config(setup),
                                  batch_size, seq_len, per_seq)


register(BenchObjective("electra", _prepare_electra, _electra_flops,
                        lambda *a, **k: build_hf_electra(*a, **k)))


# ----------------------------------------------------------------------------- data


def synthetic_batch(index: int, batch_size: int, seq_len: int, vocab: int, pair: bool,
                    first_regular: int = 5, cls: int = 2, sep: int = 3):
  """Full-length [CLS] a [SEP] (b [SEP]) sequences of random regular tokens, as numpy."""
  import numpy as np
  rng = np.random.default_rng(1000 + index)
  ids = rng.integers(first_regular, vocab, size=(batch_size, seq_len)).astype(np.int32)
  ids[:, 0] = cls
  ids[:, -1] = sep
  segments = np.zeros_like(ids)
  specials = {0, seq_len - 1}
  if pair:
    mid = seq_len // 2
    ids[:, mid] = sep
    segments[:, mid + 1:] = 1
    specials.add(mid)
  word_ids = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
  word_ids[:, sorted(specials)] = -1
  b = {"input_ids": ids, "segment_ids": segments,
       "attention_mask": np.ones_like(ids), "word_ids": word_ids,
       "example_id": (np.arange(batch_size) + index * batch_size).astype(np.int32),
       "epoch": np.zeros(batch_size, np.int32)}
  if pair:
    b["sentence_label"] = rng.integers(0, 2, size=batch_size).astype(np.int32)
  return b


# ----------------------------------------------------------------------------- measuring


def load_average() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def peak_rss_bytes() -> int:
  """This process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r if sys.platform == "darwin" else r * 1024)


def summarize(times: list[float]) -> dict[str, float]:
  s = sorted(times)
  return {"median": statistics.median(s), "min": s[0], "max": s[-1],
          "p10": s[int(0.1 * (len(s) - 1))], "p90": s[int(0.9 * (len(s) - 1))]}


@dataclasses.dataclass
class Timed:
  """One implementation: a step callable that blocks until done and returns nothing."""

  name: str
  step: Callable[[int], None]
  times: list[float] = dataclasses.field(default_factory=list)

  def run(self, n: int, offset: int) -> None:
    for i in range(n):
      t = time.perf_counter()
      self.step(offset + i)
      self.times.append(time.perf_counter() - t)


# ----------------------------------------------------------------------------- ours


class Ours:
  """Our jitted train step on the config's mesh, with pre-placed batches."""

  def __init__(self, config, batch_size: int, seq_len: int, num_batches: int = 4):
    import jax
    import numpy as np
    from bert_jax import memory, sharding, train
    from objectives.base import SpecialIds

    self.config = config
    vocab = int(config.model.vocab_size)
    self.special = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4, first_regular=5,
                              vocab_size=vocab)
    self.setup = train.build_setup(config, self.special)
    self.kind = _example_kind(self.setup)
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.logical_rules(config.sharding)
    divisor = sharding.batch_divisor(self.mesh, self.rules)
    if batch_size % (divisor * config.train.grad_accum):
      raise ValueError(f"batch size {batch_size} must be a multiple of {divisor} devices x "
                       f"grad_accum {config.train.grad_accum}")
    self.host_batches = [synthetic_batch(i, batch_size, seq_len, vocab, self.kind != "single")
                         for i in range(num_batches)]
    sample = train.dummy_batch(batch_size, seq_len, self.kind)
    self.state, shardings = train.init_state(self.setup, config.seed, sample, self.mesh,
                                             self.rules)
    self.n_params = train.count_params(self.state.params)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.batches = [train.to_global(b, self.batch_sharding) for b in self.host_batches]
    with sharding.activate(self.mesh, self.rules):
      jitted = jax.jit(functools.partial(train.train_step, setup=self.setup),
                       in_shardings=(shardings, self.batch_sharding),
                       out_shardings=(shardings, None), donate_argnums=(0,))
      t = time.perf_counter()
      self.compiled = jitted.lower(self.state, self.batches[0]).compile()
      self.compile_s = time.perf_counter() - t
    self.memory = memory.report_memory(self.compiled, self.mesh)
    self.losses: list[float] = []
    self._last = None
    # The corrupted batches, for the peer to train on the same masking.
    corrupt = jax.jit(lambda b, k: train.corrupt(self.setup, b, k))
    key = jax.random.PRNGKey(config.seed)
    self.corrupted = [jax.tree.map(np.asarray, corrupt(b, jax.random.fold_in(key, i)))
                      for i, b in enumerate(self.batches)]

  def step(self, i: int) -> None:
    import jax
    self.state, metrics = self.compiled(self.state, self.batches[i % len(self.batches)])
    jax.block_until_ready((self.state, metrics))
    self._last = metrics["loss"]

  def record_loss(self) -> None:
    if self._last is not None:
      self.losses.append(float(self._last[0]))


def mesh_size(config) -> int:
  """How many devices the config's mesh uses."""
  import math
  import jax
  from bert_jax import sharding
  return math.prod(sharding.mesh_shape(config.mesh, jax.device_count()))


def _example_kind(setup) -> str:
  import objectives as objectives_lib
  return objectives_lib.example_kind(setup.objectives)


# ----------------------------------------------------------------------------- peer


@dataclasses.dataclass
class TorchPeer:
  name: str
  model: Any
  optimizer: Any
  scheduler: Any
  batches: list[dict[str, Any]]
  device: str
  autocast_dtype: Any
  clip_norm: float
  n_params: int
  parameters: list[Any]  # what the optimizer updates (tied weights once)
  loss_fn: Callable[[dict[str, Any]], Any] | None = None  # default: model(**batch).loss
  losses: list[float] = dataclasses.field(default_factory=list)
  _last: Any = None

  def step(self, i: int) -> None:
    import torch
    b = self.batches[i % len(self.batches)]
    with torch.autocast(device_type=self.device, dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None):
      loss = self.loss_fn(b) if self.loss_fn else self.model(**b).loss
    loss.backward()
    if self.clip_norm:
      torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_norm)
    self.optimizer.step()
    self.scheduler.step()
    self.optimizer.zero_grad(set_to_none=True)
    if self.device == "cuda":
      torch.cuda.synchronize()
    self._last = loss.detach()

  def record_loss(self) -> None:
    if self._last is not None:
      self.losses.append(float(self._last))


def torch_device() -> str:
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def build_hf_bert(config, setup, corrupted: list[dict[str, Any]],
                  schedule_steps: int = 1000) -> TorchPeer:
  """transformers' BERT of our sizes: BertForPreTraining with NSP, else BertForMaskedLM."""
  import torch
  import transformers

  cfg = setup.model.encoder_config
  if cfg.embed_size != cfg.hidden_size or cfg.pre_layer_norm or cfg.num_layer_groups:
    raise ValueError("--peer hf builds BERT: factorized embeddings, pre-LN and layer "
                     "sharing have no BertFor* counterpart")
  pair = "nsp" in _objective_names(config)
  device = torch_device()
  _torch_setup(device)
  hf_cfg = transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
      hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.layer_norm_eps,
      initializer_range=cfg.initializer_range, attn_implementation="sdpa")
  cls = transformers.BertForPreTraining if pair else transformers.BertForMaskedLM
  torch.manual_seed(config.seed)
  model = cls(hf_cfg).to(device)
  model.train()
  batches = []
  for c in corrupted:
    b = {"input_ids": c["input_ids"], "token_type_ids": c["segment_ids"],
         "attention_mask": c["attention_mask"], "labels": _mlm_labels(c)}
    if pair:
      b["next_sentence_label"] = c["sentence_label"]
    batches.append(_to_torch(b, device))
  return _torch_peer(f"transformers {cls.__name__} (PyTorch {torch.__version__}, sdpa)",
                     config, model, batches, device, schedule_steps)


def _mlm_labels(c: dict[str, Any]):
  """Our gathered MLM targets as a [B, L] label array, -100 where nothing is predicted."""
  import numpy as np
  labels = np.full(c["input_ids"].shape, -100, np.int64)
  rows, cols = np.nonzero(c["mlm_weights"] > 0)
  labels[rows, c["mlm_positions"][rows, cols]] = c["mlm_ids"][rows, cols]
  return labels


def _to_torch(b: dict[str, Any], device: str) -> dict[str, Any]:
  import numpy as np
  import torch
  return {k: torch.as_tensor(np.asarray(v, np.int64), device=device) for k, v in b.items()}


def _torch_setup(device: str) -> None:
  import torch
  if device == "cuda":
    # JAX's default precision for fp32 matmuls on NVIDIA GPUs is TF32; let torch match.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _torch_peer(name: str, config, model, batches, device: str, schedule_steps: int,
                loss_fn=None) -> TorchPeer:
  """AdamW with our hyper-parameters and schedule (no decay on biases and LayerNorm)."""
  import numpy as np
  import torch
  from bert_jax import optim

  named = dict(model.named_parameters())  # tied weights appear once
  no_decay = [p for n, p in named.items() if n.endswith("bias") or "LayerNorm" in n]
  decay = [p for n, p in named.items() if not (n.endswith("bias") or "LayerNorm" in n)]
  o = config.optim
  optimizer = torch.optim.AdamW(
      [{"params": decay, "weight_decay": o.weight_decay},
       {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
  # Our warmup + decay schedule, tabulated once (no JAX call inside the timed step).
  lr_table = np.asarray(optim.learning_rate(o, config.train.steps)(
      np.arange(schedule_steps)), np.float64) / o.lr
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda i: float(lr_table[min(i, schedule_steps - 1)]))
  dtype = str(config.model.dtype)
  autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
  return TorchPeer(name=name, model=model, optimizer=optimizer, scheduler=scheduler,
                   batches=batches, device=device, autocast_dtype=autocast,
                   clip_norm=float(o.clip_norm or 0.0),
                   n_params=sum(p.numel() for p in named.values()),
                   parameters=list(named.values()), loss_fn=loss_fn)


def _electra_config(cfg, **kw):
  import transformers
  return transformers.ElectraConfig(
      vocab_size=cfg.vocab_size, embedding_size=cfg.embed_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
      hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings,
      type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.layer_norm_eps,
      initializer_range=cfg.initializer_range, attn_implementation="sdpa", **kw)


def build_hf_electra(config, setup, corrupted: list[dict[str, Any]],
                     schedule_steps: int = 1000) -> TorchPeer:
  """ELECTRA as its reference trains it, from transformers' classes: an ElectraForMaskedLM
  generator and an ElectraForPreTraining discriminator sharing the embedding tables and
  embedding LayerNorm; replacements sampled (Gumbel-max) at the masked positions without
  gradient; loss = gen_weight x MLM + disc_weight x RTD."""
  import torch
  import transformers

  cfg = setup.model.encoder_config
  gen_cfg = _generator_config(setup)
  rtd = _rtd_objective(setup)
  if cfg.pre_layer_norm or cfg.num_layer_groups:
    raise ValueError("--peer hf builds ELECTRA: pre-LN and layer sharing have no "
                     "Electra* counterpart")
  device = torch_device()
  _torch_setup(device)
  torch.manual_seed(config.seed)
  disc = transformers.ElectraForPreTraining(_electra_config(cfg)).to(device)
  gen = transformers.ElectraForMaskedLM(_electra_config(gen_cfg)).to(device)
  gen.electra.embeddings = disc.electra.embeddings  # shared tables + embedding LayerNorm
  gen.generator_lm_head.weight = disc.electra.embeddings.word_embeddings.weight
  model = torch.nn.ModuleDict({"generator": gen, "discriminator": disc})
  model.train()

  batches = []
  for c in corrupted:
    b = _to_torch({"input_ids": c["input_ids"], "token_type_ids": c["segment_ids"],
                   "attention_mask": c["attention_mask"], "labels": _mlm_labels(c),
                   "original_ids": c["original_ids"]}, device)
    b["masked"] = b["labels"] != -100
    batches.append(b)

  def loss_fn(b):
    g = gen(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
            attention_mask=b["attention_mask"], labels=b["labels"])
    with torch.no_grad():
      logits = g.logits[b["masked"]].float() / rtd.temperature
      u = torch.rand_like(logits).clamp_(1e-9, 1.0)
      sampled = torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)
      disc_ids = b["original_ids"].clone()
      disc_ids[b["masked"]] = sampled
      labels = (disc_ids != b["original_ids"]).long()
    d = disc(input_ids=disc_ids, token_type_ids=b["token_type_ids"],
             attention_mask=b["attention_mask"], labels=labels)
    return rtd.gen_weight * g.loss + rtd.disc_weight * d.loss

  return _torch_peer(f"transformers ElectraForMaskedLM + ElectraForPreTraining "
                     f"(PyTorch {torch.__version__}, sdpa)", config, model, batches, device,
                     schedule_steps, loss_fn=loss_fn)


# ----------------------------------------------------------------------------- run


def warm_up(step_fn, n: int) -> float:
  """Runs steps 0..n-1 untimed; returns the first one's seconds (compile / first-call)."""
  t = time.perf_counter()
  step_fn(0)
  first = time.perf_counter() - t
  for i in range(1, n):
    step_fn(i)
  return first


def run(config, *, peer: str = "", objective: str = "mlm", steps: int = 20, warmup: int = 2,
        round_steps: int = 5, batch_size: int | None = None, seq_len: int | None = None,
        torch_threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark and returns the results dict (what --out writes)."""
  import jax
  from bert_jax import flops

  if objective not in OBJECTIVES:
    raise ValueError(f"--objective {objective!r}: available {sorted(OBJECTIVES)}")
  bench = OBJECTIVES[objective]
  config = config.copy_and_resolve_references()
  batch_size = int(batch_size or config.train.batch_size)
  seq_len = int(seq_len or config.data.seq_len)
  if seq_len != config.data.seq_len:  # the preset's masking budget for the new length
    for section in ("mlm", "rtd"):
      if section in config:
        config[section].max_predictions = max(20, round(seq_len * config[section].rate + 0.5))
  config.data.seq_len = seq_len
  config.train.batch_size = batch_size
  bench.prepare(config)
  if seq_len > config.model.max_position_embeddings:
    raise ValueError(f"seq_len {seq_len} > model.max_position_embeddings "
                     f"{config.model.max_position_embeddings}")

  device = jax.devices()[0]
  dtype = str(config.model.dtype)
  result: dict[str, Any] = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "objective": objective, "objectives": config.objectives,
      "preset": f"{config.family},{config.size}", "batch_size": batch_size, "seq_len": seq_len,
      "dtype": dtype, "predict_all": bool(config.mlm.predict_all),
      "attention_impl": config.model.attention_impl, "remat": config.model.remat,
      "steps": steps, "warmup": warmup,
      "device": {"platform": device.platform, "device_kind": device.device_kind,
                 "num_devices": mesh_size(config), "host": platform.node(),
                 "cpu_count": os.cpu_count(), "processor": platform.processor()},
      # A persistent compilation cache makes compile_s a cache load.
      "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
      "threads": {"jax": "default (XLA CPU thread pool over all cores)",
                  "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")},
      "load_average": {"start": load_average()},
  }

  log(f"ours: building and compiling {result['preset']} {objective} "
      f"(batch {batch_size} x {seq_len}, {dtype}) on {result['device']['num_devices']} x "
      f"{device.device_kind} ...")
  ours = Ours(config, batch_size, seq_len)
  first_step_s = warm_up(ours.step, warmup)
  ours.record_loss()
  ours_peak_rss = peak_rss_bytes()
  result["load_average"]["after_ours_warmup"] = load_average()

  peak = flops.device_peak(device, dtype)

  timed = [Timed("ours", ours.step)]
  the_peer = None
  if peer:
    import torch
    torch.set_num_threads(torch_threads or os.cpu_count() or 1)
    result["threads"]["torch_intra_op"] = torch.get_num_threads()
    result["threads"]["torch_inter_op"] = torch.get_num_interop_threads()
    log("peer: building transformers model ...")
    the_peer = bench.build_peer(config, ours.setup, ours.corrupted,
                                schedule_steps=warmup + steps + 1)
    peer_first_s = warm_up(the_peer.step, warmup)
    the_peer.record_loss()
    timed.append(Timed("peer", the_peer.step))
    result["load_average"]["after_peer_warmup"] = load_average()

  log(f"timing {steps} steps each" + (f", alternating blocks of {round_steps}" if peer else ""))
  done = 0
  while done < steps:
    n = min(round_steps if peer else steps, steps - done)
    for tm in timed:
      tm.run(n, warmup + done)
    done += n
  ours.record_loss()
  if the_peer:
    the_peer.record_loss()
  result["load_average"]["end"] = load_average()
  if peak and peak.source.startswith("measured"):
    # A shared CPU's speed drifts with its load: measure again after the timed steps and
    # keep the higher figure (the lower MFU).
    again = flops.device_peak(device, dtype)
    samples = [peak.flops_per_s, again.flops_per_s]
    peak = flops.Peak(max(samples), again.source + ", before and after the timed steps "
                      "(the higher kept)")
  result["peak_flops_per_device"] = (
      {"value": peak.flops_per_s, "source": peak.source} if peak else None)
  if peak and peak.source.startswith("measured"):
    result["peak_flops_per_device"]["samples"] = samples

  tokens = batch_size * seq_len
  n_dev = int(ours.mesh.devices.size)  # the peak is per device; the step uses the mesh's

  def figures(times, step_flops, first_s, n_params, losses):
    med = statistics.median(times)
    f = {"step_time_s": med, "step_time": summarize(times), "tokens_per_s": tokens / med,
         "first_step_s": first_s, "params": int(n_params),
         "flops": step_flops.as_dict(), "achieved_flops_per_s": step_flops.total / med,
         "loss_first": losses[0] if losses else None,
         "loss_last": losses[-1] if losses else None}
    f["mfu"] = flops.mfu(step_flops.total, med, peak.flops_per_s, n_dev) if peak else None
    return f

  ours_flops = bench.step_flops(config, ours.setup, batch_size, seq_len, peer=False)
  r = figures(timed[0].times, ours_flops, first_step_s, ours.n_params, ours.losses)
  r["name"] = "bert_jax (JAX %s)" % jax.__version__
  r["compile_s"] = ours.compile_s
  r["memory"] = ours.memory
  r["xla_flops_per_device_step"] = flops.xla_flops(ours.compiled)
  r["peak_memory"] = _peak_memory_jax(device, ours_peak_rss)
  result["ours"] = r

  if the_peer:
    import torch
    pf = bench.step_flops(config, ours.setup, batch_size, seq_len, peer=True)
    p = figures(timed[1].times, pf, peer_first_s, the_peer.n_params, the_peer.losses)
    p["name"] = the_peer.name
    p["device"] = the_peer.device
    p["autocast"] = str(the_peer.autocast_dtype) if the_peer.autocast_dtype else None
    if the_peer.device == "cuda":
      p["peak_memory"] = {"bytes": int(torch.cuda.max_memory_allocated()),
                          "source": "torch.cuda.max_memory_allocated"}
    else:
      p["peak_memory"] = {"bytes": peak_rss_bytes(),
                          "source": "process peak RSS after the peer's warm-up (includes "
                                    "ours: same process, ours measured first)"}
    result["peer"] = p
    result["ratio_tokens_per_s"] = r["tokens_per_s"] / p["tokens_per_s"]
  return result


def _peak_memory_jax(device, rss: int) -> dict[str, Any]:
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001
    pass
  if stats and "peak_bytes_in_use" in stats:
    return {"bytes": int(stats["peak_bytes_in_use"]), "source": "device memory_stats"}
  return {"bytes": rss, "source": "process peak RSS (resource.getrusage)"}


# ----------------------------------------------------------------------------- output


def format_table(result: dict[str, Any]) -> str:
  GiB = 1024 ** 3
  cols = [("ours", result["ours"])] + ([("peer", result["peer"])] if "peer" in result else [])
  rows = [
      ("implementation", lambda f: f["name"]),
      ("step time (median)", lambda f: f"{f['step_time_s'] * 1e3:.1f} ms"),
      ("step time p10..p90", lambda f: f"{f['step_time']['p10'] * 1e3:.1f}.."
                                       f"{f['step_time']['p90'] * 1e3:.1f} ms"),
      ("tokens/s", lambda f: f"{f['tokens_per_s']:,.0f}"),
      ("compile / first step", lambda f: (f"{f['compile_s']:.1f} s / " if "compile_s" in f
                                          else "- / ") + f"{f['first_step_s']:.2f} s"),
      ("GFLOPs per step", lambda f: f"{f['flops']['total'] / 1e9:,.1f}"),
      ("achieved TFLOP/s", lambda f: f"{f['achieved_flops_per_s'] / 1e12:.3f}"),
      ("MFU", lambda f: "-" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"),
      ("peak memory", lambda f: f"{f['peak_memory']['bytes'] / GiB:.2f} GiB"),
      ("parameters", lambda f: f"{f['params']:,}"),
      ("loss first -> last", lambda f: f"{f['loss_first']:.3f} -> {f['loss_last']:.3f}"
                                      if f["loss_first"] is not None else "-"),
  ]
  width = max(len(r[0]) for r in rows) + 2
  colw = max(24, *(len(c[1]["name"]) + 2 for c in cols))
  d = result["device"]
  lines = [f"{result['preset']} {result['objective']}: batch {result['batch_size']} x "
           f"{result['seq_len']}, {result['dtype']}, {d['num_devices']} x {d['device_kind']} "
           f"({d['platform']}), load average {result['load_average']}"]
  lines.append(" " * width + "".join(c[0].ljust(colw) for c in cols))
  for label, fn in rows:
    lines.append(label.ljust(width) + "".join(str(fn(c[1])).ljust(colw) for c in cols))
  pk = result["peak_flops_per_device"]
  if pk:
    lines.append(f"peak per device: {pk['value'] / 1e12:.3f} TFLOP/s ({pk['source']})")
  mem = result["ours"]["memory"]
  if mem.get("total_bytes"):
    lines.append(f"ours, compiled step per device: {mem['total_bytes'] / GiB:.3f} GiB "
                 f"(temporaries {mem['temp_bytes'] / GiB:.3f} GiB)")
  if "ratio_tokens_per_s" in result:
    lines.append(f"ratio ours/peer tokens/s: {result['ratio_tokens_per_s']:.2f}x")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.peer and "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:
    # Share the GPU with torch: JAX would otherwise reserve 75% of it at start-up.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  config = FLAGS.config
  result = run(config, peer=FLAGS.peer, objective=FLAGS.objective, steps=FLAGS.steps,
               warmup=FLAGS.warmup, round_steps=FLAGS.round_steps,
               batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
               torch_threads=FLAGS.torch_threads)
  result["command"] = " ".join(["python -m launch.benchmark", *sys.argv[1:]])
  print(format_table(result), flush=True)
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=2, default=str)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  errors.run(main)
