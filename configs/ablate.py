"""Ablation grids: pretraining cells under one budget, scored on downstream tasks.

  python -m launch.ablate --config configs/ablate.py:default --workdir runs/ablate

A cell is a pretraining preset plus overrides ("field=value;field=value"); every cell gets
the same budget (steps, tokens or model FLOPs), then is fine-tuned on each task with each
seed. `distill.teacher=@CELL` points a distillation cell at another cell's checkpoint.
"""

from __future__ import annotations

import ml_collections

# name: (preset, overrides)
DEFAULT_CELLS = {
    "mlm": ("bert,tiny", "objectives=mlm:1.0"),
    "mlm_nsp": ("bert,tiny", "objectives=mlm:1.0,nsp:1.0"),
    "mlm_sop": ("bert,tiny", "objectives=mlm:1.0,sop:1.0"),
    "rtd": ("electra,tiny", ""),
    "plm": ("bert,tiny", "objectives=plm:1.0"),
    "distill": ("distilbert,tiny", "distill.teacher=@mlm"),
}


# The variants of issue #22 (docs/objectives.md): MLM alone, then each added to MLM. The
# sentence-level ones bring their own examples (segment pairs / reordered segments).
VARIANTS = ("wso", "tdd", "cap", "tdr", "sso", "sdp", "sro")
# MLM's own variants change its masking instead: [UNK] for [MASK], PMI collocations.
MLM_OPTIONS = {"mlm_unk": "mlm.replace_with=unk", "mlm_pmi": "mlm.pmi=True"}
VARIANT_CELLS = {"mlm": ("bert,tiny", "objectives=mlm:1.0"),
                 **{k: ("bert,tiny", f"objectives=mlm:1.0;{o}") for k, o in MLM_OPTIONS.items()},
                 **{f"mlm_{v}": ("bert,tiny", f"objectives=mlm:1.0,{v}:1.0") for v in VARIANTS}}
# Model FLOPs per cell (XLA's count of the compiled step, bert_jax/budget.py): about 400
# steps of MLM alone on bert,tiny (batch 32 x 128); a cell with a second pass gets fewer
# steps.
VARIANTS_FLOPS = 400 * 1.62e10  # bert,tiny MLM: 1.62e10 FLOPs per step (XLA, CPU)


def get_config(name: str = "default") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = name or "default"
  c.seed = 0
  # Every cell gets this much: "steps", "tokens" (batch x length x steps) or "flops".
  c.budget = ml_collections.ConfigDict(dict(kind="tokens", value=float(32 * 128 * 400)))
  c.cells = ml_collections.ConfigDict(
      {k: ml_collections.ConfigDict(dict(preset=p, overrides=o))
       for k, (p, o) in DEFAULT_CELLS.items()})
  c.order = ",".join(DEFAULT_CELLS)  # cells run in this order (teachers first)
  # Applied to every cell's pretraining config.
  c.pretrain_overrides = "train.eval_every=100;train.log_every=20;train.checkpoint_every=200"
  # The README demo's recipe for tiny encoders on the bundled task (sequence 64 is the
  # bundled task's own): at lr 1e-4 every tiny cell stays far below what it can reach.
  c.finetune = ml_collections.ConfigDict(dict(
      tasks="bundled", seeds="0,1,2",
      overrides="optim.lr=3e-4;train.epochs=2.0;train.log_every=100"))
  if c.name == "variants":
    c.budget.update(dict(kind="flops", value=VARIANTS_FLOPS))
    c.cells = ml_collections.ConfigDict(
        {k: ml_collections.ConfigDict(dict(preset=p, overrides=o))
         for k, (p, o) in VARIANT_CELLS.items()})
    c.order = ",".join(VARIANT_CELLS)
    # 5 seeds of 1 epoch each (the default grid: 3 seeds of 2): the grid of 10 cells then
    # fits in 90 minutes on 2 cores (docs/ablations/variants/).
    c.finetune.seeds = "0,1,2,3,4"
    c.finetune.overrides = "optim.lr=3e-4;train.epochs=1.0;train.log_every=100"
  elif c.name == "smoke":  # seconds per cell: CI and tests
    c.budget.update(dict(kind="steps", value=2.0))
    c.order = "mlm,mlm_sop"
    c.finetune.seeds = "0"
    c.finetune.overrides = "train.steps=2;train.eval_every=2"
  elif c.name != "default":
    raise ValueError(f"unknown ablation {name!r}; available: default, smoke, variants")
  c.lock()
  return c
