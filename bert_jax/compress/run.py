"""compress(workdir, out, method): one fine-tuned workdir -> a compressed one, both scored.

Methods: "int8" (qwix PTQ: int8 weights of the encoder's dense layers and int8 activations
with static scales calibrated on training batches), "qat" (fine-tune again from the run's
init with qwix fake quantization, config quant.mode=qat, then convert like int8),
"heads:F" (remove the fraction F of all attention heads with the lowest Michel et al.
importance, computed on training batches), "layers:SPEC" (drop layers: "2,5", "top:K",
"bottom:K", "alternate:K"). `finetune_epochs` > 0 fine-tunes a pruned model again (its
encoder and pooler; a fresh classifier) for that many epochs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bert_jax.compress import prune, quantize
from bert_jax.compress import workdir as wd
from bert_jax.compress.workdir import CompressError

METHODS = ("int8", "qat", "heads:FRACTION", "layers:2,5|top:K|bottom:K|alternate:K")


@dataclasses.dataclass(frozen=True)
class Method:
  kind: str  # int8 | qat | heads | layers
  arg: str = ""

  def __str__(self):
    return self.kind + (f":{self.arg}" if self.arg else "")


def parse_method(spec: str) -> Method:
  kind, _, arg = (spec or "").strip().partition(":")
  if kind in ("int8", "qat") and not arg:
    return Method(kind)
  if kind == "heads" and arg:
    try:
      f = float(arg)
    except ValueError:
      f = -1.0
    if 0.0 < f < 1.0:
      return Method(kind, arg)
    raise CompressError(f"--method={spec}: the head fraction must be a number in (0, 1)")
  if kind == "layers" and arg:
    return Method(kind, arg)
  raise CompressError(f"--method={spec!r} is not one of {', '.join(METHODS)}")


def _with(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  for key, value in fields.items():
    section, _, field = key.partition("__")
    c[section][field] = value
  return c


def compress(workdir: str, out: str, method: str | Method, *, calibration_batches: int = 8,
             importance_batches: int = 16, finetune_epochs: float = 0.0,
             seed: int | None = None, quiet: bool = True) -> dict[str, Any]:
  """Compresses the fine-tuned `workdir` into `out`; returns compression.json's record."""
  m = method if isinstance(method, Method) else parse_method(method)
  ft = wd.load_finetuned(workdir)
  out = os.path.abspath(out)
  if out == ft.workdir:
    raise CompressError("--out must differ from --workdir")
  data = wd.TaskData(ft)
  model = wd.task_model(ft.cfg, ft.config, data.n_out)
  original, _ = data.dev_scores(wd.float_apply(model), ft.params)
  main = ft.config.task.main_metric
  record: dict[str, Any] = {
      "method": str(m), "source": ft.workdir, "main_metric": main,
      "original": {"dev": original, "parameters": wd.count_params(ft.params),
                   "bytes": wd.dir_bytes(os.path.join(ft.workdir, "best"))
                   if os.path.isdir(os.path.join(ft.workdir, "best")) else None,
                   "num_layers": ft.cfg.num_layers,
                   "heads": ft.cfg.num_layers * ft.cfg.num_heads}}

  if m.kind in ("int8", "qat"):
    src = ft
    if m.kind == "qat":
      from bert_jax.finetune.loop import finetune
      qat_dir = os.path.join(out, "qat_finetune")
      qc = _with(ft.config, quant__mode="qat")
      if seed is not None:
        qc.seed = seed
      s = finetune(qc, qat_dir, quiet=quiet)
      record["qat_fake_quant_dev"] = s.best
      src = wd.load_finetuned(qat_dir)
    act = src.config.quant.act
    qparams = quantize.ptq_params(model, src.params, data.train_batches(calibration_batches),
                                  data.sample(), act)
    ptq = quantize.ptq_model(model, act)
    scores, rows = data.dev_scores(
        lambda p, b: ptq.apply({"params": p}, b, deterministic=True)["task"], qparams)
    int8_bytes = quantize.save(qparams, os.path.join(out, wd.INT8_FILE))
    params = quantize.dequantized(model, qparams, src.params)
    record.update(int8_file=os.path.join(out, wd.INT8_FILE), int8_bytes=int8_bytes,
                  act=act, calibration_batches=calibration_batches)
    cfg = src.cfg
    wd.write_workdir(out, src, cfg, params, scores, rows, _finish(record, scores, params, cfg),
                     config=src.config)
    return _read(out)

  cfg, params = ft.cfg, ft.params
  try:
    if m.kind == "heads":
      def loss_fn(p, gates, b):
        from bert_jax.finetune.tasks import task_loss
        o = model.apply({"params": p, "head_gates": gates}, b, deterministic=True)["task"]
        return task_loss(ft.config.task.kind, o, b)[0], b["example_weight"]
      batches = data.train_batches(importance_batches)
      importance = prune.head_importance(cfg, loss_fn, jax.tree.map(jnp.asarray, params),
                                         batches)
      remove = prune.heads_to_prune(cfg, importance, float(m.arg))
      cfg, params = prune.prune_heads(cfg, params, remove)
      record.update(removed_heads={str(k): v for k, v in sorted(remove.items())},
                    importance=[x.tolist() for x in importance],
                    importance_batches=importance_batches)
    else:
      drop = prune.layers_to_drop(m.arg, cfg.num_layers)
      cfg, params = prune.drop_layers(cfg, params, drop)
      record.update(dropped_layers=drop)
  except ValueError as e:
    if isinstance(e, CompressError):
      raise
    raise CompressError(f"--method={m}: {e}") from e
  small = wd.task_model(cfg, ft.config, data.n_out)
  scores, rows = data.dev_scores(wd.float_apply(small), params)
  record["oneshot_dev"] = scores
  if finetune_epochs <= 0:
    wd.write_workdir(out, ft, cfg, params, scores, rows, _finish(record, scores, params, cfg))
    return _read(out)
  # one-shot compressed model -> an init, fine-tuned again into `out`
  from bert_jax.finetune.loop import finetune
  oneshot = os.path.join(out, "oneshot")
  wd.write_workdir(oneshot, ft, cfg, params, scores, rows, dict(record))
  rc = _with(ft.config, train__epochs=float(finetune_epochs), train__steps=0)
  rc.init, rc.init_which, rc.init_step, rc.reinit_layers = oneshot, "latest", -1, 0
  if seed is not None:
    rc.seed = seed
  s = finetune(rc, out, quiet=quiet)
  tuned = wd.load_finetuned(out)
  record.update(finetune_epochs=finetune_epochs, finetune_seed=int(rc.seed))
  rec = _finish(record, s.best, tuned.params, cfg)
  rec["checkpoint_bytes"] = wd.dir_bytes(os.path.join(out, "best"))
  import json
  with open(os.path.join(out, wd.COMPRESSION_FILE), "w") as f:
    json.dump(rec, f, indent=2, sort_keys=True)
  return rec


def _finish(record, scores, params, cfg) -> dict[str, Any]:
  return dict(record, compressed={
      "dev": scores, "parameters": wd.count_params(params), "num_layers": cfg.num_layers,
      "heads": sum(cfg.layer_heads(i) for i in range(cfg.num_layers))})


def _read(out: str) -> dict[str, Any]:
  import json
  with open(os.path.join(out, wd.COMPRESSION_FILE)) as f:
    return json.load(f)


def report(rec: dict[str, Any]) -> str:
  main = rec["main_metric"]
  o, c = rec["original"], rec["compressed"]
  lines = [f"method       {rec['method']}",
           f"dev {main:<10s} original {o['dev'][main]:.4f}   compressed {c['dev'][main]:.4f}"
           f"   ({c['dev'][main] - o['dev'][main]:+.4f})"]
  if "oneshot_dev" in rec and "finetune_epochs" in rec:
    lines.append(f"             (before the {rec['finetune_epochs']:g}-epoch fine-tune: "
                 f"{rec['oneshot_dev'][main]:.4f})")
  lines.append(f"parameters   original {o['parameters']:,}   compressed {c['parameters']:,}")
  lines.append(f"layers/heads original {o['num_layers']}/{o['heads']}   compressed "
               f"{c['num_layers']}/{c['heads']}")
  if "int8_bytes" in rec:
    lines.append(f"int8 weights {rec['int8_bytes']:,} bytes ({rec['int8_file']})")
  if o.get("bytes"):
    lines.append(f"checkpoint   original {o['bytes']:,} bytes   compressed "
                 f"{rec['checkpoint_bytes']:,} bytes (float32)")
  return "\n".join(lines)
