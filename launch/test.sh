#!/usr/bin/env bash
# Creates .venv (Python 3.11+) with the test extras if needed, then runs the test suite.
# Extra arguments go to pytest; the default skips tests marked slow (run them with
# `bash launch/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest tests -q -n 2 --durations=15 "$@"
