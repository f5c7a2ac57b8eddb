#!/usr/bin/env bash
# Create .venv/ at the repository root and install certremove with its dev extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.certremove-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    python -m pip install -q --upgrade pip
    # torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1).
    python -m pip install -q -e '.[dev]'
    # the removal step's fused kernels (core/fused.py), compiled once into core/__pycache__
    # rather than by the first worker that loads a large model
    python -c "from core import fused; fused.available()"
    touch "$stamp"
fi
