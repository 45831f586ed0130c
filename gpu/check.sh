#!/usr/bin/env bash
# `make gpu-check`: the one command to run where a GPU is at hand. It trains on Keras's JAX
# backend; where this Python lacks digitune's dependencies (a GPU machine's own image, say),
# it installs the wheels carried in .whl/ (`make gpu-wheels`, gpu/wheels.txt) into a
# temporary folder first. Results go to $OUT (the folder a remote runner collects) or
# gpu/results/; `digitune register --bundle <that folder>` registers the best trial here.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu/results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
if ! "$python" -c "import keras, optuna, mlflow, optuna_integration" 2>/dev/null; then
    if [ ! -d .whl ]; then
        echo "error: $python lacks keras, optuna or mlflow, and there is no .whl/ to install" \
            "them from: run 'make gpu-wheels' where pip reaches a package index" >&2
        exit 1
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/digitune-site .whl/*.whl
    export PYTHONPATH="/tmp/digitune-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}"
if [ -z "${MNIST_DIR:-}" ] && [ -d .gpu/mnist ]; then export MNIST_DIR="$PWD/.gpu/mnist"; fi
export PYTHONUNBUFFERED=1
{
    date -u "+%Y-%m-%d %H:%M:%S UTC"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>/dev/null ||
        echo "no nvidia-smi"
    "$python" -m digitune gpu-check --out "$out" "$@"
} 2>&1 | tee "$out/gpu-check.log"
