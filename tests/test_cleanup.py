"""`digitune gc` on a real tuned study: it frees what it says, keeps the best trials' weights
(ensembles still build from them) and never touches registered models."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from conftest import TINY_STUDY, write_study
from digitune import cli, config, data, ensemble, garbage, tracking
from digitune.data import mnist
from digitune.engines import optuna_search

pytestmark = pytest.mark.slow


def artifact_bytes(client, run_id, path=None) -> int:
    """Counted here, independently of the command."""
    total = 0
    for item in client.list_artifacts(run_id, path):
        total += artifact_bytes(client, run_id, item.path) if item.is_dir else item.file_size
    return total


def test_gc_frees_all_but_the_best_trials_and_the_registry_still_serves(project, capsys):
    study_file = write_study(project, TINY_STUDY.replace("n_trials = 3", "n_trials = 4"))
    outcome = optuna_search.run(study_file)
    client = tracking.configure(create=True)
    trials = {
        int(run.data.tags["trial_number"]): run
        for run in tracking.child_runs(outcome.parent_run_id)
        if "trial_number" in run.data.tags
    }
    before = {number: artifact_bytes(client, run.info.run_id) for number, run in trials.items()}
    assert all(size > 0 for size in before.values())
    best = outcome.best.number

    # A dry run says what would go and deletes nothing.
    assert cli.main(["gc", "--keep", "1", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    others = sum(size for number, size in before.items() if number != best)
    assert f"would free {others / 1e6:.1f} MB of artifacts of 3 trial runs" in printed
    assert {n: artifact_bytes(client, r.info.run_id) for n, r in trials.items()} == before

    collected = garbage.collect(keep=1)
    assert collected.freed_bytes == others
    assert sorted(collected.runs["trial"]) == sorted(n for n in trials if n != best)
    after = {number: artifact_bytes(client, run.info.run_id) for number, run in trials.items()}
    assert after == {number: (before[best] if number == best else 0) for number in trials}
    assert garbage.DELETED_TAG in client.get_run(trials[(best + 1) % 4].info.run_id).data.tags
    # Runs and their metrics stay for the MLflow UI.
    assert all(client.get_run(r.info.run_id).data.metrics for r in trials.values())

    # The registered model never depended on trial artifacts; the best trial still ensembles.
    digits = mnist.load()
    challenger = mlflow.pyfunc.load_model(f"models:/{config.REGISTERED_MODEL_NAME}@challenger")
    predicted = np.asarray(challenger.predict(data.preprocess(digits.test_images))).argmax(1)
    assert np.mean(predicted == digits.test_labels) == pytest.approx(
        outcome.test_accuracy, abs=1e-4
    )
    assert ensemble.run(study_file, top=1).members == [best]

    # A second collection finds nothing left to free.
    assert garbage.collect(keep=1).freed_bytes == 0


FRONT_STUDY = """
[study]
name = "front"
n_trials = 4
seed = 3
n_startup_trials = 4

[objectives]
minimize = ["params"]

[registry]
model_name = "mnist-front"

[training]
max_epochs = 1
precision = "float32"

[space]
learning_rate = 0.005
batch_size = 32
num_conv_blocks = 2
num_filters = { type = "int", low = 4, high = 24, step = 4 }
global_average_pooling = true
dense_units = 0
"""


def test_gc_keep_0_spares_the_best_trial_and_the_pareto_front(project, capsys):
    """What other commands still load survives `--keep 0`: the best trial's weights (resume,
    refit, ensemble) and every Pareto-front trial's (`select`)."""
    study_file = write_study(project, FRONT_STUDY, "front.toml")
    outcome = optuna_search.run(study_file)
    front = sorted(t.number for t in outcome.study.best_trials)
    best = outcome.best.number
    client = tracking.configure(create=True)
    runs = {
        int(run.data.tags["trial_number"]): run.info.run_id
        for run in tracking.child_runs(outcome.parent_run_id)
        if "trial_number" in run.data.tags
    }
    assert len(front) < len(runs)  # Something to collect.

    collected = garbage.collect(keep=0)

    kept = sorted(n for n, run_id in runs.items() if artifact_bytes(client, run_id) > 0)
    assert kept == sorted({best, *front})
    assert sorted(collected.runs["trial"]) == sorted(set(runs) - {best, *front})
    # select registers each front trial, and the study resumes from its best.
    for trial in outcome.study.best_trials:
        limit = f"{trial.user_attrs['costs']['params']:.0f}"
        assert cli.main(["select", "--study", str(study_file), "--max-params", limit]) == 0, (
            capsys.readouterr().err
        )
    assert optuna_search.run(study_file).best.number == best
