"""Run an ablation grid: each cell pretrains under the same budget, then fine-tunes.

Cells are ordinary workdirs under OUT/cells/<name>/ (pretrain/, ft_<task>_s<seed>/), so an
interrupted ablation resumes where it stopped: a cell with a result.json is skipped, a
half-done cell resumes its runs. A failed cell is reported (failed.json with the error) and
the others go on. OUT/results.csv, results.md and PNG plots summarise the grid.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import json
import math
import os
import time
import traceback
from typing import Any, Callable

import ml_collections
import numpy as np

import objectives as objectives_lib
from bert_jax import metrics as metrics_lib
from bert_jax import run_config
from bert_jax import seeds as seeds_lib
from bert_jax.budget import Budget, step_flops
from bert_jax.compile_cache import use_compilation_cache

RESULT, FAILED = "result.json", "failed.json"


def parse_overrides(spec: str) -> list[tuple[str, Any]]:
  """'a.b=1;c=mlm:1.0' -> [('a.b', 1), ('c', 'mlm:1.0')] (python literals, else strings)."""
  out = []
  for part in (p.strip() for p in (spec or "").split(";")):
    if not part:
      continue
    key, sep, raw = part.partition("=")
    if not sep:
      raise ValueError(f"override {part!r} is not field=value")
    try:
      value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      value = raw.strip()
    out.append((key.strip(), value))
  return out


def apply_overrides(config: ml_collections.ConfigDict, spec: str) -> None:
  for key, value in parse_overrides(spec):
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"override {key!r}: no such config field")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    node[leaf] = value


@dataclasses.dataclass
class CellResult:
  name: str
  status: str  # done | failed | unavailable
  objectives: str = ""
  steps: int = 0
  budget_spent: float = 0.0
  pretrain: dict[str, float] = dataclasses.field(default_factory=dict)  # last eval metrics
  scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # task -> per seed
  wall_time_s: float = 0.0
  tokens_per_second: float = 0.0
  error: str = ""
  model_flops: float = 0.0  # pretraining model FLOPs (budget.step_flops x steps), any budget kind


def pretrain_config(ablation: ml_collections.ConfigDict, name: str, out: str):
  from configs.pretrain import get_config
  cell = ablation.cells[name]
  config = get_config(cell.preset)
  config.seed = ablation.seed
  apply_overrides(config, ablation.pretrain_overrides)
  overrides = cell.overrides
  for key, value in parse_overrides(overrides):  # @cell -> that cell's pretraining workdir
    if isinstance(value, str) and value.startswith("@"):
      overrides = overrides.replace(f"={value}", f"={cell_dir(out, value[1:])}/pretrain")
  apply_overrides(config, overrides)
  config = objectives_lib.complete_config(config)  # e.g. a student's tokenizer: its teacher's
  budget = Budget(ablation.budget.kind, float(ablation.budget.value))
  config.train.steps = budget.steps_for(config)
  config.train.eval_every = min(config.train.eval_every, config.train.steps)
  return config, budget


def cell_dir(out: str, name: str) -> str:
  return os.path.join(out, "cells", name)


def unavailable(config) -> list[str]:
  known = set(objectives_lib.available())
  return [n for n, _ in objectives_lib.parse_spec(config.objectives) if n not in known]


def run_cell(ablation, name: str, out: str, *, pretrain_fn: Callable, finetune_fn: Callable
             ) -> CellResult:
  directory = cell_dir(out, name)
  os.makedirs(directory, exist_ok=True)
  start = time.perf_counter()
  try:
    config, budget = pretrain_config(ablation, name, out)
  except Exception as e:  # an objective or preset that does not exist yet
    objectives_named = ablation.cells[name].overrides
    return CellResult(name, "unavailable", objectives=objectives_named, error=str(e))
  missing = unavailable(config)
  if missing:
    return CellResult(name, "unavailable", objectives=config.objectives,
                      error=f"objective(s) {missing} not available")
  summary = pretrain_fn(config, os.path.join(directory, "pretrain"))
  result = CellResult(name, "done", objectives=config.objectives, steps=config.train.steps,
                      budget_spent=budget.spent(config, config.train.steps),
                      pretrain=last_eval(os.path.join(directory, "pretrain")),
                      tokens_per_second=summary.tokens_per_second,
                      model_flops=step_flops(config) * config.train.steps)
  for task in [t for t in ablation.finetune.tasks.split(",") if t]:
    scores = []
    for seed in [int(s) for s in str(ablation.finetune.seeds).split(",") if s.strip()]:
      scores.append(finetune_fn(ablation, task, seed, os.path.join(directory, "pretrain"),
                                os.path.join(directory, f"ft_{task}_s{seed}")))
    result.scores[task] = scores
  result.wall_time_s = time.perf_counter() - start
  return result


def last_eval(workdir: str) -> dict[str, float]:
  """The last eval row of a run's own metrics.jsonl (what the table reports)."""
  rows = [r for r in metrics_lib.latest_rows(metrics_lib.read_metrics(workdir))
          if r["split"] == "eval"]
  if not rows:
    return {}
  last = max(rows, key=lambda r: r["step"])
  return {k: float(v) for k, v in last.items() if k not in ("step", "split", "time")}


def finetune_score(ablation, task: str, seed: int, init: str, workdir: str) -> float:
  """Fine-tunes `init` on `task`; returns the dev main metric of the best checkpoint."""
  from bert_jax.finetune import finetune
  from configs.finetune import get_config
  config = get_config(task)
  config.init = init
  config.seed = seed
  apply_overrides(config, ablation.finetune.overrides)
  summary = finetune(config, workdir, quiet=True)
  return float(summary.best.get(summary.main_metric, float("nan")))


def default_pretrain(config, workdir):
  from bert_jax import train
  return train.train_and_evaluate(config, workdir)


def run_ablation(ablation: ml_collections.ConfigDict, out: str, *,
                 pretrain_fn: Callable = default_pretrain,
                 finetune_fn: Callable = finetune_score,
                 log: Callable[[str], None] = print) -> list[CellResult]:
  os.makedirs(out, exist_ok=True)
  # Cells of one architecture fine-tune the same shapes 3 x tasks x seeds times.
  use_compilation_cache(os.path.join(out, "jax_cache"))
  with open(os.path.join(out, "ablation.json"), "w") as f:
    f.write(ablation.to_json_best_effort(indent=2))
  names = [n for n in ablation.order.split(",") if n]
  unknown = [n for n in names if n not in ablation.cells]
  if unknown:
    raise ValueError(f"order names unknown cells {unknown}; cells: {sorted(ablation.cells)}")
  results = []
  for i, name in enumerate(names, 1):
    done = os.path.join(cell_dir(out, name), RESULT)
    if os.path.exists(done):
      with open(done) as f:
        results.append(CellResult(**json.load(f)))
      log(f"[{i}/{len(names)}] {name}: done already, skipped")
      continue
    log(f"[{i}/{len(names)}] {name}: running")
    try:
      result = run_cell(ablation, name, out, pretrain_fn=pretrain_fn, finetune_fn=finetune_fn)
    except Exception as e:  # report, keep going with the other cells
      result = CellResult(name, "failed", error=f"{type(e).__name__}: {e}")
      with open(os.path.join(cell_dir(out, name), FAILED), "w") as f:
        json.dump({"error": result.error, "traceback": traceback.format_exc()}, f, indent=2)
      log(f"[{i}/{len(names)}] {name}: FAILED ({result.error})")
    if result.status == "done":
      with open(done, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
      failed = os.path.join(cell_dir(out, name), FAILED)
      if os.path.exists(failed):
        os.remove(failed)
    elif result.status == "unavailable":
      log(f"[{i}/{len(names)}] {name}: unavailable ({result.error})")
    results.append(result)
  write_results(results, out, ablation)
  return results


# ----------------------------------------------------------------------------- reports


def _mean_std(xs: list[float]) -> tuple[float, float]:
  a = np.asarray(xs, dtype=np.float64)
  return (float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0) if len(a) else (
      math.nan, math.nan)


def fill_model_flops(results: list[CellResult], out: str) -> None:
  """Model FLOPs of done cells whose result.json predates the field, from their saved config."""
  for r in results:
    workdir = os.path.join(cell_dir(out, r.name), "pretrain")
    if r.status == "done" and not r.model_flops and os.path.exists(
        os.path.join(workdir, run_config.CONFIG_FILE)):
      r.model_flops = step_flops(run_config.load(workdir)) * r.steps


def write_results(results: list[CellResult], out: str, ablation) -> None:
  fill_model_flops(results, out)
  tasks = sorted({t for r in results for t in r.scores})
  pre_keys = sorted({k for r in results for k in r.pretrain if k.endswith(("loss", "accuracy"))})
  unit = ablation.budget.kind
  header = (["cell", "status", "objectives", "steps", f"budget_{unit}", "model_flops"] + pre_keys +
            [f"{t}_mean" for t in tasks] + [f"{t}_std" for t in tasks] +
            ["wall_time_s", "tokens_per_s"])
  rows = []
  for r in results:
    stats = {t: _mean_std(r.scores.get(t, [])) for t in tasks}
    rows.append([r.name, r.status, r.objectives, r.steps, r.budget_spent, r.model_flops] +
                [r.pretrain.get(k, math.nan) for k in pre_keys] +
                [stats[t][0] for t in tasks] + [stats[t][1] for t in tasks] +
                [round(r.wall_time_s, 1), round(r.tokens_per_second, 1)])
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)

  def fmt(x):
    return "–" if isinstance(x, float) and math.isnan(x) else (
        f"{x:.4g}" if isinstance(x, float) else str(x))

  by_name = {r.name: r for r in results}
  baseline = ablation.get("baseline") or str(ablation.order).split(",")[0].strip()
  md = [f"# Ablation `{ablation.name}`: budget {fmt(float(ablation.budget.value))} {unit} per cell",
        "", "| cell | status | objectives | steps | model FLOPs | " + " | ".join(pre_keys) + " | " +
        " | ".join(f"{t} (mean ± std [95% CI] over seeds)" for t in tasks) + " | " +
        " | ".join(f"{t} vs {baseline}: difference [95% CI], paired t" for t in tasks) +
        " | wall s | tok/s |",
        "|" + "---|" * (5 + len(pre_keys) + 2 * len(tasks) + 2)]
  base_scores = {t: dict(enumerate(by_name[baseline].scores.get(t, [])))
                 if baseline in by_name else {} for t in tasks}
  for r in results:
    scores, versus = [], []
    for t in tasks:
      m, s = _mean_std(r.scores.get(t, []))
      iv = seeds_lib.interval(r.scores.get(t, []))
      ci = f" [{iv.low:.4f}, {iv.high:.4f}]" if iv.n > 1 else ""
      scores.append("–" if math.isnan(m) else f"{m:.4f} ± {s:.4f}{ci}")
      # Seeds are the same list for every cell: pair them by position.
      pair = seeds_lib.paired(dict(enumerate(r.scores.get(t, []))), base_scores[t])
      versus.append("baseline" if r.name == baseline else "–" if pair.verdict == "n/a" else
                    f"{pair.difference.mean:+.4f} [{pair.difference.low:+.4f}, "
                    f"{pair.difference.high:+.4f}], p={pair.p_value:.3f}: **{pair.verdict}**")
    status = r.status if r.status == "done" else f"{r.status}: {r.error[:80]}"
    flops_text = f"{r.model_flops:.3g}" if r.model_flops else "–"
    md.append(f"| {r.name} | {status} | {r.objectives} | {r.steps} | {flops_text} | " +
              " | ".join(fmt(r.pretrain.get(k, math.nan)) for k in pre_keys) + " | " +
              " | ".join(scores) + " | " + " | ".join(versus) +
              f" | {r.wall_time_s:.0f} | {r.tokens_per_second:,.0f} |")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  plot_results(results, out, ablation, tasks)


def plot_results(results, out: str, ablation, tasks: list[str]) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  done = [r for r in results if r.status == "done"]
  paths = []
  unit = ablation.budget.kind
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for r in done:  # pretraining loss against the budget's unit
    rows = metrics_lib.latest_rows(metrics_lib.read_metrics(
        os.path.join(cell_dir(out, r.name), "pretrain")))
    pts = [(row["step"], row["loss"]) for row in rows if row["split"] == "train"]
    if pts and r.steps:
      per_step = r.budget_spent / r.steps
      s, v = zip(*pts)
      ax.plot([x * per_step for x in s], v, label=f"{r.name} ({r.objectives})")
  ax.set_xlabel(unit)
  ax.set_ylabel("pretraining loss (train)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out, "pretrain_loss.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  for t in tasks:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in done]
    stats = [_mean_std(r.scores.get(t, [])) for r in done]
    a1.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4, color="#4c72b0")
    a1.set_ylabel(f"{t} dev score")
    a1.set_title(f"{t}: mean ± std over seeds")
    a1.tick_params(axis="x", rotation=30)
    # Model FLOPs, not the budget's unit: under a steps or tokens budget the cells differ
    # in compute (ELECTRA's generator, PLM's query stream, a teacher's forward).
    for r, (m, s) in zip(done, stats):
      a2.errorbar([r.model_flops], [m], yerr=[s], fmt="o", capsize=4, label=r.name)
    a2.set_xlabel("pretraining compute (model FLOPs)")
    a2.set_ylabel(f"{t} dev score")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, f"scores_{t}.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths
