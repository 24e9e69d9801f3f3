r"""Time our jitted train step, and the transformers PyTorch step beside it in the same run.

  python -m launch.benchmark --config configs/pretrain.py:bert,small --peer hf \
      [--steps 20] [--batch_size 32] [--seq_len 128] [--objectives mlm:1.0] \
      [--out bench.json] [--config.model.dtype=bfloat16 ...]

Ours: `bert_jax.train.train_step` (corruption, forward, backward, AdamW, all in one jitted
function with donated state) on synthetic full-length sequences, compiled ahead of time
(the compile time is reported) and timed with `jax.block_until_ready` after every step.
Any objectives run (the config's, or `--objectives`, which is `--config.objectives`).
Peer (`--peer hf`): the transformers model the objectives name (`Objective.torch_peer`,
objectives/torch_peers.py): `BertForPreTraining` (MLM + NSP/SOP) or `BertForMaskedLM`
(MLM), the ELECTRA generator + discriminator pair (RTD), of the same sizes, SDPA
attention, the same dropout, torch AdamW with the same
lr schedule / betas / eps / weight decay (no decay on biases and LayerNorm) and clipping,
bf16 autocast when our compute dtype is bf16, fed the batches our masking produced
(labels -100 where nothing is predicted), on the same device (cuda when torch has one).

Both run in this process, alternating blocks of `--round_steps` steps, so that a noisy
machine slows both alike; the figures are medians. MFU counts the FLOPs each step really
computes: ours XLA's count of the compiled step (`cost_analysis`: every op, the optimizer
and any rematerialisation included), the peer's by the hand formulas of `bert_jax.flops`
(it projects every position onto the vocabulary; our MLM only the masked ones). Threads: torch uses os.cpu_count()
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
  flags.DEFINE_string("objectives", "", "Weighted objectives to run, e.g. 'mlm:1.0' (the "
                      "same as --config.objectives; default: the config's).")
  flags.DEFINE_integer("steps", 20, "Timed steps per implementation (after warm-up).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation / before timing.")
  flags.DEFINE_integer("round_steps", 5, "Steps per block when alternating with the peer.")
  flags.DEFINE_integer("batch_size", None, "Global batch size (default: config.train.batch_size).")
  flags.DEFINE_integer("seq_len", None, "Sequence length (default: config.data.seq_len).")
  flags.DEFINE_integer("torch_threads", None,
                       "torch intra-op threads for the peer (default: os.cpu_count()).")
  flags.DEFINE_string("out", "", "Write the results as JSON here.")


# ----------------------------------------------------------------------------- objectives


def peer_builder(composition) -> Callable[..., Any]:
  """The transformers builder the objectives name (`Objective.torch_peer`); one for all."""
  import importlib
  named = {w.objective.name: w.objective.torch_peer() for w in composition}
  peers = set(named.values())
  if None in peers or len(peers) != 1:
    raise ValueError(f"--peer hf: objectives {named} have no one PyTorch peer between them "
                     "(each names it with Objective.torch_peer)")
  module, _, fn = peers.pop().partition(":")
  return getattr(importlib.import_module(module), fn)


def for_seq_len(config, seq_len: int) -> None:
  """Every objective section sized for the new length as the presets size it."""
  import objectives as objectives_lib
  for name in objectives_lib.available():
    if name in config:
      objectives_lib.get(name).for_seq_len(config, seq_len)


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
    self.kind = self.setup.objectives.example_kind
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.logical_rules(config.sharding)
    divisor = sharding.batch_divisor(self.mesh, self.rules)
    if batch_size % (divisor * config.train.grad_accum):
      raise ValueError(f"batch size {batch_size} must be a multiple of {divisor} devices x "
                       f"grad_accum {config.train.grad_accum}")
    self.host_batches = [synthetic_batch(i, batch_size, seq_len, vocab, self.kind.segments == 2)
                         for i in range(num_batches)]
    sample = train.dummy_batch(batch_size, seq_len, self.kind.name)
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
  flops: Any = None  # bert_jax.flops.StepFlops of one step (hand formula)
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


def _torch_setup(device: str) -> None:
  import torch
  if device == "cuda":
    # JAX's default precision for fp32 matmuls on NVIDIA GPUs is TF32; let torch match.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def build_peer(config, setup, corrupted: list[dict[str, Any]],
               schedule_steps: int = 1000) -> TorchPeer:
  """The objectives' transformers model (`peer_builder`), trained like ours."""
  device = torch_device()
  _torch_setup(device)
  built = peer_builder(setup.objectives)(config, setup, corrupted, device)
  return _torch_peer(built.name, config, built.model, built.batches, device, schedule_steps,
                     built.loss_fn, built.flops)


def _torch_peer(name: str, config, model, batches, device: str, schedule_steps: int,
                loss_fn=None, step_flops=None) -> TorchPeer:
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
                   parameters=list(named.values()), loss_fn=loss_fn, flops=step_flops)


# ----------------------------------------------------------------------------- run


def warm_up(step_fn, n: int) -> float:
  """Runs steps 0..n-1 untimed; returns the first one's seconds (compile / first-call)."""
  t = time.perf_counter()
  step_fn(0)
  first = time.perf_counter() - t
  for i in range(1, n):
    step_fn(i)
  return first


def bench_config(config, objectives: str = "", batch_size: int | None = None,
                 seq_len: int | None = None):
  """A resolved copy of `config` at this batch size and length (the objectives' prediction
  budgets rescaled to the length), with `objectives` replacing config.objectives if given."""
  config = config.copy_and_resolve_references()
  if objectives:
    config.objectives = objectives
  batch_size = int(batch_size or config.train.batch_size)
  seq_len = int(seq_len or config.data.seq_len)
  if seq_len != config.data.seq_len:  # the preset's prediction budgets for the new length
    for_seq_len(config, seq_len)
  config.data.seq_len = seq_len
  config.train.batch_size = batch_size
  if seq_len > config.model.max_position_embeddings:
    raise ValueError(f"seq_len {seq_len} > model.max_position_embeddings "
                     f"{config.model.max_position_embeddings}")
  return config


def cudnn_attention_calls(compiled) -> list[str]:
  """The cuDNN fused-attention custom calls in a compiled step (forward and backward):
  `attention_impl=auto` falls back to XLA's kernel silently, so say which one ran."""
  import re
  return sorted(set(re.findall(r"__cudnn\$fmha\w*", compiled.as_text())))


def run(config, *, peer: str = "", objectives: str = "", steps: int = 20, warmup: int = 2,
        round_steps: int = 5, batch_size: int | None = None, seq_len: int | None = None,
        torch_threads: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark and returns the results dict (what --out writes). `objectives`
  replaces config.objectives when given."""
  import jax
  import objectives as objectives_lib
  from bert_jax import flops
  from bert_jax.budget import stand_in_special

  config = bench_config(config, objectives, batch_size, seq_len)
  batch_size, seq_len = int(config.train.batch_size), int(config.data.seq_len)
  names = [n for n, _ in objectives_lib.parse_spec(config.objectives)]
  if peer:  # refused before anything compiles
    peer_builder(objectives_lib.build(config, stand_in_special(config.model.vocab_size)))

  device = jax.devices()[0]
  dtype = str(config.model.dtype)
  result: dict[str, Any] = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "objectives": config.objectives,
      "objective_config": {n: config[n].to_dict() for n in names if n in config},
      "preset": f"{config.family},{config.size}", "batch_size": batch_size, "seq_len": seq_len,
      "dtype": dtype,
      "attention_impl": config.model.attention_impl,
      "attention_dropout": float(config.model.attention_dropout), "remat": config.model.remat,
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

  log(f"ours: building and compiling {result['preset']} {config.objectives} "
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
    the_peer = build_peer(config, ours.setup, ours.corrupted, schedule_steps=warmup + steps + 1)
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

  def figures(times, step_flops: dict | None, first_s, n_params, losses):
    """step_flops: {"total", ...} of one step, None when not counted."""
    med = statistics.median(times)
    total = step_flops["total"] if step_flops else None
    f = {"step_time_s": med, "step_time": summarize(times), "tokens_per_s": tokens / med,
         "first_step_s": first_s, "params": int(n_params), "flops": step_flops,
         "achieved_flops_per_s": total / med if total else None,
         "loss_first": losses[0] if losses else None,
         "loss_last": losses[-1] if losses else None}
    f["mfu"] = flops.mfu(total, med, peak.flops_per_s, n_dev) if peak and total else None
    return f

  per_device = flops.xla_flops(ours.compiled)
  ours_flops = per_device and {
      "tokens": tokens, "total": per_device * n_dev, "per_token": per_device * n_dev / tokens,
      "source": "XLA cost_analysis of the compiled step, x devices"}
  r = figures(timed[0].times, ours_flops, first_step_s, ours.n_params, ours.losses)
  r["name"] = "bert_jax (JAX %s)" % jax.__version__
  r["compile_s"] = ours.compile_s
  r["memory"] = ours.memory
  r["xla_flops_per_device_step"] = per_device
  r["cudnn_attention_calls"] = cudnn_attention_calls(ours.compiled)
  r["peak_memory"] = _peak_memory_jax(device, ours_peak_rss)
  result["ours"] = r

  if the_peer:
    import torch
    pf = dict(the_peer.flops.as_dict(), source="bert_jax.flops (hand formula)")
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
      ("GFLOPs per step", lambda f: "-" if not f["flops"] else
       f"{f['flops']['total'] / 1e9:,.1f} ({f['flops']['source'].split(' ')[0]})"),
      ("achieved TFLOP/s", lambda f: "-" if not f["achieved_flops_per_s"] else
       f"{f['achieved_flops_per_s'] / 1e12:.3f}"),
      ("MFU", lambda f: "-" if f["mfu"] is None else f"{100 * f['mfu']:.1f}%"),
      ("peak memory", lambda f: f"{f['peak_memory']['bytes'] / GiB:.2f} GiB"),
      ("parameters", lambda f: f"{f['params']:,}"),
      ("loss first -> last", lambda f: f"{f['loss_first']:.3f} -> {f['loss_last']:.3f}"
                                      if f["loss_first"] is not None else "-"),
  ]
  width = max(len(r[0]) for r in rows) + 2
  colw = max(24, *(len(c[1]["name"]) + 2 for c in cols))
  d = result["device"]
  lines = [f"{result['preset']} {result['objectives']}: batch {result['batch_size']} x "
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
  lines.append("ours, cuDNN fused attention: " + (", ".join(
      result["ours"].get("cudnn_attention_calls") or []) or "none (XLA / explicit attention)"))
  if "ratio_tokens_per_s" in result:
    lines.append(f"ratio ours/peer tokens/s: {result['ratio_tokens_per_s']:.2f}x")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.peer and "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ:
    # Share the GPU with torch: JAX would otherwise reserve 75% of it at start-up.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  config = FLAGS.config
  result = run(config, peer=FLAGS.peer, objectives=FLAGS.objectives, steps=FLAGS.steps,
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
