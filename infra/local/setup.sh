#!/usr/bin/env bash
# Runs: creates ./.venv (if missing) and installs vitlabel with its test and demo extras into it.
# torch is pinned to the CPU build first so pip never pulls a multi-GB CUDA build on a laptop or CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test,demo]"
