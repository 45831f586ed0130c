"""End to end: a tiny real study on a real MNIST subset, with real Optuna and MLflow stores.

Asserts what a user looks at: trial states, the parent and child runs in MLflow, per-epoch
metrics, confusion-matrix artifacts and the registered `mnist-cnn` version.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from conftest import TINY_STUDY, write_study
from digitune import cli, config, data, study_file, tracking
from digitune import study as studies
from digitune.data import mnist
from digitune.engines import optuna_search

pytestmark = pytest.mark.slow


def _runs(client, experiment_name):
    experiment = client.get_experiment_by_name(experiment_name)
    return client.search_runs([experiment.experiment_id], max_results=100)


def test_tiny_study_is_tracked_and_registered(project, capsys):
    study_file = write_study(project, TINY_STUDY)
    outcome = optuna_search.run(study_file)

    # Optuna: three finished trials in the default storage under studies/.
    assert (project / "studies" / "tiny.db").exists()
    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    assert len(study.trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert completed and outcome.best.number == study.best_trial.number

    # MLflow: one parent run and one child per trial, none left RUNNING.
    client = mlflow.MlflowClient()
    runs = _runs(client, "tiny")
    parents = [r for r in runs if r.data.tags.get("digitune.role") == "study"]
    assert len(parents) == 1
    parent = parents[0]
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"trial-0000", "trial-0001", "trial-0002"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert study.user_attrs[tracking.PARENT_RUN_ATTR] == parent.info.run_id

    for trial in study.trials:
        child = children[f"trial-{trial.number:04d}"]
        assert child.data.tags["state"] == trial.state.name
        assert child.data.tags["trial_number"] == f"{trial.number:04d}"  # sorts as text too
        assert float(child.data.params["learning_rate"]) == pytest.approx(
            trial.params["learning_rate"]
        )
        assert child.data.params["batch_size"] == "64"  # fixed values are logged too
        epochs = len(trial.intermediate_values)
        # Each epoch is logged at the training images seen by its end: 1,500 an epoch here.
        seen = [1500 * (epoch + 1) for epoch in range(epochs)]
        for metric in (
            "loss",
            "accuracy",
            "val_loss",
            "val_accuracy",
            "epoch_seconds",
            "best_val_accuracy",
        ):
            history = client.get_metric_history(child.info.run_id, metric)
            assert [m.step for m in sorted(history, key=lambda m: m.step)] == seen
        val_history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.value for m in sorted(val_history, key=lambda m: m.step)] == pytest.approx(
            [trial.intermediate_values[step] for step in range(epochs)]
        )
        # The objective so far, pruned trials included: what the runs table sorts trials by.
        best_history = client.get_metric_history(child.info.run_id, "best_val_accuracy")
        assert [m.value for m in sorted(best_history, key=lambda m: m.step)] == pytest.approx(
            list(np.maximum.accumulate([trial.intermediate_values[s] for s in range(epochs)]))
        )
        if trial.state == TrialState.COMPLETE:
            assert child.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        if trial.state == TrialState.COMPLETE:
            assert {"val_confusion_matrix.png", "val_confusion_matrix.json", "weights"} <= artifacts
            matrix = mlflow.artifacts.load_dict(
                f"{child.info.artifact_uri}/val_confusion_matrix.json"
            )
            assert (
                np.array(matrix["confusion_matrix"]).sum() == 300
            )  # the fixture's validation images
            assert np.trace(matrix["confusion_matrix"]) / 300 == pytest.approx(
                trial.value, abs=1e-6
            )
        else:
            assert "val_confusion_matrix.png" not in artifacts

    # Artifacts live under the project's mlruns/, next to the store.
    assert parent.info.artifact_uri.startswith((project / "mlruns" / "artifacts" / "tiny").as_uri())

    # The parent holds the configuration, datasets and the best model's test evaluation.
    parent = client.get_run(parent.info.run_id)
    assert parent.data.params["study.name"] == "tiny"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(outcome.test_accuracy)
    assert parent.data.tags["best_trial"] == str(outcome.best.number)
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "test_confusion_matrix.png",
        "test_confusion_matrix.json",
        "config.json",
    } <= parent_artifacts
    test_matrix = mlflow.artifacts.load_dict(
        f"{parent.info.artifact_uri}/test_confusion_matrix.json"
    )
    assert np.array(test_matrix["confusion_matrix"]).sum() == 300
    contexts = {d.tags[0].value for d in parent.inputs.dataset_inputs}
    assert contexts == {"training", "validation"}

    # The report: the trials table and the study's figures, logged when the study ended.
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/trials.csv",
        "report/optimization_history.png",
        "report/intermediate_values.png",
        "report/parallel_coordinate.png",
        "report/param_importances.png",
        "report/slice.png",
        "report/contour.png",
    } <= report_files
    trials_csv = mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/report/trials.csv")
    assert trials_csv.splitlines()[0].startswith("number,state,value,epochs,seconds")
    assert len(trials_csv.splitlines()) == 4

    # The registry: a version with alias challenger that loads and predicts.
    version = client.get_model_version_by_alias(config.REGISTERED_MODEL_NAME, "challenger")
    assert str(version.version) == outcome.model_version
    assert version.tags["study"] == "tiny"
    assert version.tags["trial"] == str(outcome.best.number)
    assert float(version.tags["validation_accuracy"]) == pytest.approx(
        outcome.best.validation_accuracy, abs=1e-4
    )
    assert float(version.tags["test_accuracy"]) == pytest.approx(outcome.test_accuracy, abs=1e-4)
    assert len(version.tags["data_sha256"]) == 64
    assert "test accuracy" in version.description
    # It predicts the fixture's test set with the accuracy its tag claims, counted here.
    loaded = mlflow.pyfunc.load_model("models:/mnist-cnn@challenger")
    digits = mnist.load()
    probabilities = np.asarray(loaded.predict(data.preprocess(digits.test_images)))
    assert probabilities.shape == (300, 10)
    accuracy = np.mean(probabilities.argmax(1) == digits.test_labels)
    assert float(version.tags["test_accuracy"]) == pytest.approx(accuracy, abs=1e-4)
    assert accuracy > 0.5  # Far above the 0.1 of a guess: it learned digits.

    # Resuming with a larger budget adds trials under the same parent and registers once more
    # only if the best trial changed.
    again = optuna_search.run(study_file, n_trials=4)
    assert len(again.study.trials) == 4
    runs = _runs(client, "tiny")
    assert len([r for r in runs if r.data.tags.get("digitune.role") == "study"]) == 1
    assert len(runs) == 5
    versions = client.search_model_versions("name = 'mnist-cnn'")
    assert len(versions) == (1 if again.best.number == outcome.best.number else 2)

    # A script's run: one more trial, the summary as JSON alone on stdout, nothing registered.
    capsys.readouterr()
    assert (
        cli.main(["tune", "--study", str(study_file), "--trials", "5", "--json", "--no-register"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["trials"] == 5 and sum(summary["states"].values()) == 5
    assert summary["model_version"] is None and summary["alias"] is None
    assert summary["study"] == "tiny" and summary["engine"] == "optuna"
    assert 0 < summary["test_accuracy"] <= 1 and "learning_rate" in summary["params"]
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == len(versions)

    # The study's settings are those it started with: another max_epochs is refused, and says
    # which setting and both values; nothing more is run.
    changed = write_study(project, TINY_STUDY.replace("max_epochs = 2", "max_epochs = 3"))
    with pytest.raises(ValueError, match=r"\[training\] max_epochs is 2 in the study, 3 here"):
        optuna_search.run(changed, n_trials=6)
    assert len(studies.load_existing(study_file)[1].trials) == 5


def test_report_summarises_a_study(project, capsys):
    study_file = write_study(project, TINY_STUDY)
    optuna_search.run(study_file)
    capsys.readouterr()
    assert cli.main(["report", "--study", str(study_file)]) == 0
    printed = capsys.readouterr().out
    assert "study 'tiny': 3 trials" in printed
    assert "top 10 trials:" in printed and "parameter importances (fANOVA):" in printed
    # Every sampled hyperparameter is ranked (three trials say little about the order; the
    # ranking itself is checked on a study of known importances in test_report.py).
    lines = printed.splitlines()
    ranked = lines[lines.index("parameter importances (fANOVA):") + 1 :][:3]
    assert sorted(line.split()[0] for line in ranked) == [
        "dropout_rate",
        "learning_rate",
        "num_filters",
    ]


def test_report_of_a_study_that_was_never_run(project, capsys):
    study_file = write_study(project, TINY_STUDY)
    assert cli.main(["report", "--study", str(study_file)]) == 1
    assert "no study 'tiny'" in capsys.readouterr().err


def test_a_bad_trial_is_really_pruned(project):
    study_path = write_study(
        project,
        TINY_STUDY.replace("n_trials = 3", "n_trials = 2").replace("low = 1e-3", "low = 1e-6"),
    )
    study = studies.load_or_create(study_file.load(study_path), None)
    # A sound trial first, then one whose learning rate is far too low to learn anything in
    # an epoch: the median pruner must stop it after its first epoch.
    study.enqueue_trial({"learning_rate": 3e-3, "num_filters": 16, "dropout_rate": 0.0})
    study.enqueue_trial({"learning_rate": 1e-6, "num_filters": 8, "dropout_rate": 0.0})
    outcome = optuna_search.run(study_path)
    good, bad = outcome.study.trials
    assert good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED
    assert list(bad.intermediate_values) == [0]
    assert bad.intermediate_values[0] < good.intermediate_values[0]
    run = mlflow.get_run(bad.user_attrs[tracking.TRIAL_RUN_ATTR])
    assert run.data.tags["state"] == "PRUNED" and run.info.status == "FINISHED"
    assert "pruned at epoch 0" in run.data.tags["pruned_reason"]


def test_successive_halving_prunes_a_bad_trial_at_its_first_rung(project):
    study_path = write_study(
        project,
        TINY_STUDY.replace("n_trials = 3", "n_trials = 2")
        .replace("low = 1e-3", "low = 1e-6")
        .replace("max_epochs = 2", "max_epochs = 3")
        .replace(
            "pruner_warmup_epochs = 0", 'pruner_warmup_epochs = 1\npruner = "successive_halving"'
        ),
    )
    study = studies.load_or_create(study_file.load(study_path), None)
    assert isinstance(study.pruner, optuna.pruners.SuccessiveHalvingPruner)
    study.enqueue_trial({"learning_rate": 3e-3, "num_filters": 16, "dropout_rate": 0.0})
    study.enqueue_trial({"learning_rate": 1e-6, "num_filters": 8, "dropout_rate": 0.0})
    outcome = optuna_search.run(study_path)
    good, bad = outcome.study.trials
    # The first trial meets no competitor at its rungs; the second is compared with it after
    # its second epoch (rung 0, step 1) and, worse, stops there.
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 3
    assert bad.state == TrialState.PRUNED
    assert list(bad.intermediate_values) == [0, 1]
    assert bad.intermediate_values[1] < good.intermediate_values[1]
    # Its line says how far it trained, in epochs of the fixture's training images.
    images = len(data.split(mnist.load()).y_train)
    assert bad.user_attrs[studies.EPOCH_IMAGES_ATTR] == images
    assert studies.trial_line(bad).endswith(f"pruned after 2 epoch(s) of {images:,} images")
    assert studies.DEADLINE_ATTR not in good.user_attrs
    assert studies.trial_line(good).endswith("dropout_rate=0")  # complete: nothing to add


def test_a_trial_the_study_s_deadline_cuts_short_says_so(project, capsys):
    # 6 seconds for a trial of up to 500 epochs: it ends at the first epoch end after that.
    study_file = write_study(
        project,
        TINY_STUDY.replace("n_trials = 3", "n_trials = 1\ntimeout_minutes = 0.1").replace(
            "max_epochs = 2", "max_epochs = 500\nearly_stopping_patience = 500"
        ),
    )
    assert cli.main(["tune", "--study", str(study_file)]) == 0
    printed = capsys.readouterr()
    assert "1 complete but cut short by the deadline\n" in printed.out
    # Not on a terminal (a pipe, a log file, CI): no progress bar redrawing itself in the text.
    assert "it/s" not in printed.err and "\r" not in printed.err
    (trial,) = studies.load_existing(study_file)[1].trials
    epochs = len(trial.intermediate_values)
    assert trial.state == TrialState.COMPLETE and 1 <= epochs < 500
    assert trial.user_attrs["epochs"] == epochs and trial.user_attrs[studies.DEADLINE_ATTR]
    images = len(data.split(mnist.load()).y_train)
    assert studies.trial_line(trial).endswith(
        f"cut short by the study's deadline after {epochs} epoch(s) of {images:,} images"
    )


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(project):
    study_path = write_study(
        project,
        TINY_STUDY.replace("n_trials = 3", "n_trials = 2").replace("high = 3e-3", "high = 1e30"),
    )
    study = studies.load_or_create(study_file.load(study_path), None)
    study.enqueue_trial({"learning_rate": 1e30, "num_filters": 8, "dropout_rate": 0.0})
    study.enqueue_trial({"learning_rate": 3e-3, "num_filters": 8, "dropout_rate": 0.0})
    outcome = optuna_search.run(study_path)
    diverged, sound = outcome.study.trials
    assert diverged.state == TrialState.FAIL
    assert "learning_rate=1e+30 is probably too high" in diverged.user_attrs["fail_reason"]
    run = mlflow.get_run(diverged.user_attrs[tracking.TRIAL_RUN_ATTR])
    assert run.info.status == "FAILED" and run.data.tags["state"] == "FAIL"
    assert "too high" in run.data.tags["fail_reason"]
    assert sound.state == TrialState.COMPLETE
    assert outcome.best.number == sound.number


def test_cli_reports_a_broken_study_file_before_training(project, capsys):
    study_file = write_study(
        project, "[space]\ndropout_rate = { type = 'float', low = 0.9, high = 0.1 }"
    )
    assert cli.main(["tune", "--study", str(study_file)]) == 1
    error = capsys.readouterr().err
    assert str(study_file) in error and "dropout_rate" in error
    assert not (project / "mlruns").exists()


def test_cli_reports_a_tracking_store_that_is_down(project, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: closed
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study_file = write_study(project, TINY_STUDY)
    assert cli.main(["tune", "--study", str(study_file)]) == 1
    error = capsys.readouterr().err
    assert "cannot reach the MLflow tracking store http://127.0.0.1:9" in error
    assert not (project / "studies" / "tiny.db").exists()


def test_cli_reports_corrupted_data(project, tmp_path, monkeypatch, capsys, fixture_dir):
    import shutil

    broken = tmp_path / "broken-mnist"
    shutil.copytree(fixture_dir, broken)
    (broken / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    monkeypatch.setenv("MNIST_DIR", str(broken))
    assert cli.main(["data"]) == 1
    assert f"{broken}/train-labels-idx1-ubyte.gz" in capsys.readouterr().err


def test_enqueued_configurations_run_first_and_once(project):
    warm_start = "\n[[enqueue]]\nnum_filters = 16\nlearning_rate = 0.002\n"
    study_file = write_study(
        project, TINY_STUDY.replace("n_trials = 3", "n_trials = 2") + warm_start
    )
    optuna_search.run(study_file, register=False)
    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    first = study.trials[0]
    assert first.params["num_filters"] == 16
    assert first.params["learning_rate"] == 0.002
    assert 0.0 <= first.params["dropout_rate"] <= 0.3  # the sampler filled in the rest

    # Resumed for one more trial, the study does not run its warm start again.
    optuna_search.run(study_file, n_trials=3, register=False)
    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    assert len(study.trials) == 3
    assert [t.params["learning_rate"] for t in study.trials].count(0.002) == 1


def test_every_trial_trains_in_the_study_precision(project):
    # Keras's clear_session between trials also resets the dtype policy to float32; the
    # policy each trial's model really had is recorded on its run.
    study = (
        TINY_STUDY.replace("n_trials = 3", "n_trials = 2")
        .replace("max_epochs = 2", "max_epochs = 1")
        .replace('precision = "float32"', 'precision = "mixed_bfloat16"')
    )
    optuna_search.run(write_study(project, study), register=False)
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    trials = [r for r in runs if r.data.tags.get("digitune.role") != "study"]
    assert [r.data.tags["precision"] for r in trials] == ["mixed_bfloat16"] * 2


def test_a_stray_signal_to_an_earlier_command_does_not_stop_the_next(project):
    """A SIGTERM that reached this process before (in a test worker that runs many commands,
    or a notebook) set the stop flag; the next tune still runs its trials."""
    import os
    import signal

    from digitune import trainer

    trainer.stop_cleanly_on_ctrl_c()
    os.kill(os.getpid(), signal.SIGTERM)  # What the handler makes of it: the flag, set.
    assert trainer.STOP.is_set()
    study_file_path = write_study(project, TINY_STUDY)
    assert cli.main(["tune", "--study", str(study_file_path), "--trials", "1"]) == 0
    trials = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny")).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE]
