"""launch/report.py: the table and plot hold the numbers of the runs' own metrics files."""

import subprocess
import sys

from bert_jax import metrics as metrics_lib
from tests.conftest import REPO


def write_run(path, losses, accs):
  w = metrics_lib.MetricWriter(str(path), enabled=True)
  for step, (loss, acc) in enumerate(zip(losses, accs)):
    w.write(step * 10, "eval", {"loss": loss, "nsp/accuracy": acc, "tokens": 1.0})
    w.write(step * 10, "train", {"loss": loss + 1})
  w.write(10, "eval", {"loss": 0.125, "nsp/accuracy": 0.75})  # a step logged again (resume)
  w.close()


def test_report_tables_and_plot(tmp_path):
  write_run(tmp_path / "a", [3.0, 2.5, 2.0], [0.5, 0.6, 0.7])
  write_run(tmp_path / "b", [4.0, 3.5, 3.25], [0.5, 0.55, 0.5625])
  png = tmp_path / "out" / "cmp.png"
  r = subprocess.run([sys.executable, "-m", "launch.report", f"--workdir={tmp_path / 'a'}",
                      f"--workdir={tmp_path / 'b'}", f"--plot={png}"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  a, b = r.stdout.split("### b")
  assert "| step | loss | nsp/accuracy |" in a and "tokens" not in a  # default keys
  assert "| 0 | 3.0000 | 0.5000 |" in a and "| 20 | 2.0000 | 0.7000 |" in a
  assert "| 10 | 0.1250 | 0.7500 |" in a and "2.5000" not in a  # the last row of step 10
  assert "| 20 | 3.2500 | 0.5625 |" in b
  assert png.stat().st_size > 1000
  empty = tmp_path / "empty"
  empty.mkdir()
  r = subprocess.run([sys.executable, "-m", "launch.report", f"--workdir={empty}"], cwd=REPO,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "no eval rows" in r.stderr
