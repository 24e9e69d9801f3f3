"""Ablations: equal budgets, resume after an interruption, failed cells, the results."""

import csv
import dataclasses
import json
import os

import pytest

from bert_jax import ablate
from bert_jax import metrics as metrics_lib
from bert_jax import run_config
from bert_jax.budget import Budget, step_flops
from configs.ablate import get_config as ablation_config
from configs.pretrain import get_config


def test_token_budget_gives_equal_tokens_within_one_step():
  budget = Budget("tokens", 32 * 128 * 400 + 1000)
  configs = [get_config("bert,tiny"), get_config("electra,tiny"), get_config("bert,small")]
  configs[1].train.batch_size = 48
  configs[2].data.seq_len = 64
  for c in configs:
    steps = budget.steps_for(c)
    per_step = c.train.batch_size * c.data.seq_len
    assert abs(budget.spent(c, steps) - budget.value) <= per_step / 2 + 1e-6


def test_flop_budget_counts_the_generator_and_second_tasks():
  mlm, rtd = get_config("bert,tiny"), get_config("electra,tiny")
  mlm.objectives = "mlm:1.0"
  rtd.model.update(dict(embedding_size=None))
  rtd_flops = step_flops(rtd)
  disc_only = step_flops(mlm)  # same encoder; RTD adds a generator and the discriminator head
  assert rtd_flops > disc_only
  budget = Budget("flops", 1000 * disc_only)
  assert budget.steps_for(mlm) == 1000
  assert budget.steps_for(rtd) < 1000
  for c in (mlm, rtd):
    assert abs(budget.spent(c, budget.steps_for(c)) - budget.value) <= step_flops(c) / 2 + 1


def test_compiled_step_flops_agree_with_the_hand_formula():
  # XLA's count of the compiled bert,tiny MLM step against bert_jax.flops' model FLOPs (6 x
  # matmul weights per token, attention, the MLM head at the masked positions): 1.06x when
  # measured, the rest being what the formula leaves out (softmax, LayerNorm, GELU, the
  # loss and AdamW's update). Never below it: every matmul it counts is in the step.
  from bert_jax import flops
  from bert_jax.encoder import EncoderConfig
  c = get_config("bert,tiny")
  c.objectives = "mlm:1.0"
  hand = flops.mlm_step_flops(EncoderConfig.from_dict(c.model), c.train.batch_size,
                              c.data.seq_len, c.mlm.max_predictions).total
  one = step_flops(c)
  assert 1.0 <= one / hand <= 1.15
  c.train.grad_accum = 4  # how a run splits its batch does not change what a step computes
  assert step_flops(c) == one


def fake_runs(calls):
  """Pretrain/finetune stand-ins that write real metrics files (orchestration only)."""

  def pretrain(config, workdir):
    calls.append(("pretrain", workdir))
    if "mlm_sop" in workdir and not os.environ.get("ABLATE_FIXED"):
      raise RuntimeError("simulated crash")
    os.makedirs(workdir, exist_ok=True)
    w = metrics_lib.MetricWriter(workdir, enabled=True)
    for step in range(1, config.train.steps + 1):
      w.write(step, "train", {"loss": 10.0 / step})
    w.write(config.train.steps, "eval", {"loss": 1.5 + len(workdir) % 3, "mlm/accuracy": 0.25})
    w.close()
    return type("S", (), {"last_eval": None, "tokens_per_second": 123.0})()

  def finetune(ablation, task, seed, init, workdir):
    calls.append(("finetune", workdir))
    return 0.5 + 0.1 * seed

  return pretrain, finetune


def test_resume_skips_finished_cells_and_reports_failures(tmp_path, monkeypatch):
  abl = ablation_config("default")
  abl.unlock()
  abl.order = "mlm,mlm_sop,rtd"
  abl.budget.update(dict(kind="steps", value=3.0))
  abl.finetune.seeds = "0,1"
  calls = []
  pretrain, finetune = fake_runs(calls)
  results = ablate.run_ablation(abl, str(tmp_path), pretrain_fn=pretrain, finetune_fn=finetune,
                                log=lambda m: None)
  status = {r.name: r.status for r in results}
  assert status == {"mlm": "done", "mlm_sop": "failed", "rtd": "done"}
  assert "simulated crash" in json.load(open(tmp_path / "cells/mlm_sop/failed.json"))["error"]
  monkeypatch.setenv("ABLATE_FIXED", "1")
  calls.clear()
  results = ablate.run_ablation(abl, str(tmp_path), pretrain_fn=pretrain, finetune_fn=finetune,
                                log=lambda m: None)
  assert [c for c in calls if c[0] == "pretrain"] == [
      ("pretrain", str(tmp_path / "cells/mlm_sop/pretrain"))]  # only the failed cell reran
  assert all(r.status == "done" for r in results)
  assert not (tmp_path / "cells/mlm_sop/failed.json").exists()

  with open(tmp_path / "results.csv") as f:
    rows = {r["cell"]: r for r in csv.DictReader(f)}
  for name in ("mlm", "mlm_sop", "rtd"):
    own = [r for r in metrics_lib.read_metrics(tmp_path / f"cells/{name}/pretrain")
           if r["split"] == "eval"][-1]
    assert float(rows[name]["loss"]) == pytest.approx(own["loss"])
    assert float(rows[name]["bundled_mean"]) == pytest.approx(0.55)
    assert float(rows[name]["steps"]) == 3
  md = (tmp_path / "results.md").read_text()
  assert "0.5500 ± 0.0707 [-0.0853, 1.1853]" in md  # t_{0.975, 1} = 12.706
  # Every cell scored as the baseline (mlm) on both seeds: a difference of 0 is noise.
  assert "bundled vs mlm" in md and md.count("p=1.000: **noise**") == 2
  for png in ("pretrain_loss.png", "scores_bundled.png"):
    assert (tmp_path / png).stat().st_size > 1000

  # Model FLOPs per cell: the budget module's per-step count of the cell's own config (the
  # MLM + SOP cell pays for the pair head on top of the MLM cell's encoder and head).
  flops = {}
  for name in ("mlm", "mlm_sop", "rtd"):
    config, _ = ablate.pretrain_config(abl, name, str(tmp_path))
    flops[name] = float(rows[name]["model_flops"])
    assert flops[name] == pytest.approx(step_flops(config) * 3)
  assert flops["mlm_sop"] > flops["mlm"] > 0
  # A result.json written before the field existed gets it from the cell's saved config.
  done = tmp_path / "cells/mlm/result.json"
  old = json.load(open(done))
  del old["model_flops"]
  json.dump(old, open(done, "w"))
  config, _ = ablate.pretrain_config(abl, "mlm", str(tmp_path))
  run_config.save(config, str(tmp_path / "cells/mlm/pretrain"))
  ablate.run_ablation(abl, str(tmp_path), pretrain_fn=pretrain, finetune_fn=finetune,
                      log=lambda m: None)
  with open(tmp_path / "results.csv") as f:
    rows = {r["cell"]: r for r in csv.DictReader(f)}
  assert float(rows["mlm"]["model_flops"]) == pytest.approx(flops["mlm"])


def test_unavailable_objective_is_listed_not_dropped(tmp_path):
  abl = ablation_config("default")
  abl.unlock()
  abl.cells["future"] = abl.cells["mlm"].copy_and_resolve_references()
  abl.cells["future"].overrides = "objectives=mlm:1.0,nonexistent:1.0"
  abl.order = "future"
  calls = []
  pretrain, finetune = fake_runs(calls)
  results = ablate.run_ablation(abl, str(tmp_path), pretrain_fn=pretrain, finetune_fn=finetune,
                                log=lambda m: None)
  assert results[0].status == "unavailable" and not calls
  assert "unavailable" in (tmp_path / "results.md").read_text()


def test_teacher_cell_reference_gives_the_student_its_workdir_and_tokenizer(tmp_path):
  config, _ = ablate.pretrain_config(ablation_config("default"), "distill", str(tmp_path))
  teacher = os.path.join(ablate.cell_dir(str(tmp_path), "mlm"), "pretrain")
  assert config.distill.teacher == teacher
  assert config.data.tokenizer == os.path.join(teacher, "tokenizer.model")
  mlm, _ = ablate.pretrain_config(ablation_config("default"), "mlm", str(tmp_path))
  assert mlm.data.tokenizer == ""  # other cells train their own (the same one)
