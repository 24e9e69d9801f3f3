r"""Held-out metrics of one or more runs: a markdown table per run and one plot.

  python -m launch.report --workdir runs/a --workdir runs/b \
      [--keys loss,nsp/accuracy] [--every 100] [--plot docs/figures/a_vs_b.png]

Reads each workdir's metrics.jsonl (the last row of a step logged twice after a resume).
Default keys: every eval loss, accuracy and recall the runs logged.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from launch import errors

from bert_jax import metrics as metrics_lib

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Run directory (repeatable).", required=True)
flags.DEFINE_list("keys", [], "Eval metrics to report (default: losses, accuracies, recalls).")
flags.DEFINE_integer("every", 0, "Only steps that are multiples of this (0: every eval).")
flags.DEFINE_string("plot", "", "Write a PNG of the eval metrics against step here.")

REPORTED = ("loss", "accuracy", "recall")
CHANCE = {"nsp/accuracy": 0.5, "sop/accuracy": 0.5}  # balanced binary sentence tasks


def eval_rows(workdir: str) -> list[dict]:
  rows = [r for r in metrics_lib.latest_rows(metrics_lib.read_metrics(workdir))
          if r["split"] == "eval"]
  if not rows:
    raise SystemExit(f"error: no eval rows in {workdir}/{metrics_lib.METRICS_FILE}")
  return rows


def default_keys(rows: Sequence[dict]) -> list[str]:
  keys = {k for r in rows for k in r if k.endswith(REPORTED)}
  return sorted(keys, key=lambda k: (k != "loss", k))


def markdown_table(rows: Sequence[dict], keys: Sequence[str], every: int = 0) -> str:
  last = rows[-1]["step"]
  kept = [r for r in rows if not every or r["step"] % every == 0 or r["step"] == last]
  lines = ["| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for r in kept:
    cells = [f"{r[k]:.4f}" if k in r else "" for k in keys]
    lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(runs: dict[str, list[dict]], keys: Sequence[str], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, (name, rows) in enumerate(runs.items()):  # one colour per run in every panel
      pts = [(r["step"], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), "o-", markersize=3, label=name, color=f"C{i}")
    ax.set(title=f"eval {key}", xlabel="step")
    ax.grid(alpha=0.3)
    if key in CHANCE:
      ax.axhline(CHANCE[key], color="grey", lw=0.8, ls="--", label="chance")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv):
  del argv
  runs = {os.path.basename(os.path.normpath(w)): eval_rows(w) for w in FLAGS.workdir}
  keys = FLAGS.keys or default_keys([r for rows in runs.values() for r in rows])
  for name, rows in runs.items():
    print(f"### {name}\n\n{markdown_table(rows, keys, FLAGS.every)}\n")
  if FLAGS.plot:
    print(f"wrote {plot(runs, keys, FLAGS.plot)}")


if __name__ == "__main__":
  errors.run(main)
