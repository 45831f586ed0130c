"""The JAX route, end to end, as on a GPU machine without TensorFlow: a tiny study trains on
Keras's JAX backend with TensorFlow blocked from import, and its best trial is registered by
a TensorFlow process whose predictions equal the JAX model's on held-out digits.

These run in the second pass of `make test` (KERAS_BACKEND=jax, tests/without_tensorflow on
PYTHONPATH); the first pass, on TensorFlow, skips them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import FIXTURE_DIR, TINY_STUDY, write_study

pytestmark = [
    pytest.mark.jax,
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("KERAS_BACKEND") != "jax", reason="the JAX pass of `make test` runs these"
    ),
]

BLOCKER = str(Path(__file__).parent / "without_tensorflow")


def in_tensorflow(arguments: list[str], project: Path) -> subprocess.CompletedProcess:
    """A TensorFlow process on the same project: the blocker off PYTHONPATH, its backend on."""
    path = [part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part]
    environment = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "PYTHONPATH": os.pathsep.join(part for part in path if part != BLOCKER),
        "DIGITUNE_HOME": str(project),
    }
    return subprocess.run(
        [sys.executable, *arguments], env=environment, capture_output=True, text=True, timeout=300
    )


def test_tensorflow_is_blocked_and_keras_runs_on_jax():
    import keras

    with pytest.raises(ImportError, match="blocked"):
        import tensorflow  # noqa: F401
    assert keras.backend.backend() == "jax"


def test_a_study_trains_on_jax_and_a_tensorflow_process_registers_it(project):
    from digitune import artifacts, tracking
    from digitune.data import mnist
    from digitune.engines import optuna_search

    study_path = write_study(project, TINY_STUDY.replace("max_epochs = 2", "max_epochs = 3"))
    outcome = optuna_search.run(study_path, register=False)

    # Pruning and tracking, as on TensorFlow: three trials, each a run tagged with its
    # backend, logging the objective at every epoch.
    assert outcome.trials == 3 and outcome.model_version is None
    assert {"complete"} <= set(outcome.states) <= {"complete", "pruned"}
    client = mlflow.MlflowClient()
    runs = tracking.child_runs(outcome.parent_run_id)
    assert sorted(run.info.run_name for run in runs) == ["trial-0000", "trial-0001", "trial-0002"]
    for run in runs:
        assert run.data.tags["backend"].startswith("jax ")
        assert run.data.tags["precision"] == "float32"
        objective = client.get_metric_history(run.info.run_id, "best_val_accuracy")
        assert objective
        # Compilation is told apart from training once a second epoch ran.
        assert ("compile_seconds" in run.data.metrics) == (len(objective) > 1)
    best = outcome.best
    assert client.get_run(best.run_id).data.metrics["best_val_accuracy"] == pytest.approx(
        best.validation_accuracy
    )

    # The best trial's model as JAX computes it, on the fixture's held-out test digits.
    digits = mnist.load_folder(FIXTURE_DIR)
    images = digits.test_images.astype("float32")[..., None] / 255
    jax_probabilities = np.asarray(artifacts.load_model(best.params, best.run_id).predict(images))

    # Registered by a TensorFlow process from the weights JAX trained; its test accuracy is
    # the one measured here, and the registered model predicts what the JAX model does.
    registered = in_tensorflow(
        ["-m", "digitune", "register", "--study", str(study_path), "--json"], project
    )
    assert registered.returncode == 0, registered.stderr[-3000:]
    result = json.loads(registered.stdout)
    assert result["trial"] == best.number and result["model_version"] == "1"
    assert result["test_accuracy"] == pytest.approx(outcome.test_accuracy, abs=1e-6)
    np.save(project / "images.npy", images)
    predicted = in_tensorflow(
        [
            "-c",
            "import mlflow, numpy as np, sys; from digitune import tracking; "
            "tracking.configure(create=True); "
            "model = mlflow.pyfunc.load_model('models:/mnist-cnn@challenger'); "
            "np.save(sys.argv[1], np.asarray(model.predict(np.load(sys.argv[2]))))",
            str(project / "tensorflow.npy"),
            str(project / "images.npy"),
        ],
        project,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    tensorflow_probabilities = np.load(project / "tensorflow.npy")
    assert (tensorflow_probabilities.argmax(1) == jax_probabilities.argmax(1)).all()
    np.testing.assert_allclose(tensorflow_probabilities, jax_probabilities, atol=1e-4)
    # Registering the same trial again changes nothing.
    again = in_tensorflow(
        ["-m", "digitune", "register", "--study", str(study_path), "--json"], project
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["model_version"] == "1"


def test_the_gpu_check_runs_dry_on_the_cpu(project, tmp_path):
    from digitune import cli

    out = tmp_path / "out"
    assert cli.main(["gpu-check", "--cpu", "--out", str(out), "--workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"].startswith("jax ") and summary["dry_run_on_cpu"]
    assert [row["batch_size"] for row in summary["throughput"]] == [128, 512, 2048]
    assert all(row["images_per_second"] > 0 for row in summary["throughput"])
    assert summary["configurations"] >= 1
    assert {path.name for path in out.iterdir()} >= {
        "summary.json",
        "summary.md",
        "trials.csv",
        "throughput.csv",
        "best.json",
        "best.weights.h5",
    }
    bundle = json.loads((out / "best.json").read_text())
    assert bundle["trial"] == summary["best_trial"] and len(bundle["data_sha256"]) == 64
