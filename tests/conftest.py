"""Shared fixtures: a real MNIST subset and a throw-away project folder per test."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "mnist-subset"
# The real MNIST, laid beside the checkout here and in CI; tests that need it skip otherwise.
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def fixture_dir() -> Path:
    return FIXTURE_DIR


@pytest.fixture
def real_mnist_dir() -> Path:
    if not (SHARED_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the real MNIST files are not at {SHARED_MNIST}")
    return SHARED_MNIST


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder with its own Optuna and MLflow stores, reading the fixture."""
    monkeypatch.setenv("DIGITUNE_HOME", str(tmp_path))
    monkeypatch.setenv("MNIST_DIR", str(FIXTURE_DIR))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "studies").mkdir()
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def write_study(folder: Path, text: str, name: str = "tiny.toml") -> Path:
    path = folder / "studies" / name
    path.write_text(text)
    return path


TINY_STUDY = """
[study]
name = "tiny"
n_trials = 3
seed = 7
n_startup_trials = 2
pruner_startup_trials = 1
pruner_warmup_epochs = 0

[training]
max_epochs = 2

[space]
learning_rate = { type = "float", low = 1e-3, high = 3e-3, log = true }
batch_size = 64
num_filters = { type = "int", low = 8, high = 16, step = 8 }
dense_units = 32
dropout_rate = { type = "float", low = 0.0, high = 0.3 }
"""
