#!/usr/bin/env bash
# The main job: creates .venv if needed, pretrains the tiny BERT on the bundled corpus
# (training its tokenizer first), then runs the fine-tuning demo when it is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python -m launch.demo "$@"
