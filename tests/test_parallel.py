"""Many workers on one study, on SQLite and a real PostgreSQL server; crashes and resumption.

PostgreSQL: the server named by DIGITUNE_TEST_POSTGRES (default: postgres at 127.0.0.1:5432,
trust authentication, as `.ci/run` makes sure of); each test creates and drops its own
database, and the tests skip, saying why, when no server answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from conftest import TINY_STUDY, free_port, kill_session, wait_for, write_study
from digitune import cli, config, study_file, tracking
from digitune import study as studies
from digitune.engines import optuna_search

pytestmark = pytest.mark.slow
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

# Trials long enough to be caught in the middle, and heartbeats quick enough to test.
CRASHABLE_STUDY = (
    TINY_STUDY.replace("n_trials = 3", "n_trials = 2")
    .replace("max_epochs = 2", "max_epochs = 20\nearly_stopping_patience = 20")
    .replace("[training]", "heartbeat_seconds = 1\nheartbeat_grace_seconds = 3\n\n[training]")
)


def assert_one_parent_with_a_child_per_trial(study: optuna.Study) -> None:
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("digitune.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(
        f"trial-{t.number:04d}" for t in study.trials
    )
    assert all(r.info.status != "RUNNING" for r in runs)


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_two_workers_share_one_study(project, storage, request, capfd, caplog):
    url = request.getfixturevalue("postgres_url") if storage == "postgresql" else None
    # Workers log at the launcher's level: INFO, as the command line sets it.
    caplog.set_level("INFO", logger="digitune")
    # The study file asks for the two workers.
    study_file = write_study(
        project, TINY_STUDY.replace("n_trials = 3", "n_trials = 6\nworkers = 2")
    )
    outcome = optuna_search.run(study_file, storage=url)

    trials = outcome.study.trials
    # Six, or seven when both workers finished a trial at the same instant (see study.optimize).
    assert len(trials) in (6, 7)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    assert_one_parent_with_a_child_per_trial(outcome.study)
    # Both workers ran trials, each in a process of its own, and the best model was
    # registered once.
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2 and os.getpid() not in {int(w.split(":")[1]) for w in workers}
    # The workers start as quietly as the command: no native TensorFlow start-up lines.
    printed = capfd.readouterr()
    assert "[worker 1/2] trial" in printed.out + printed.err
    assert "oneDNN" not in printed.err and "InitializeLog" not in printed.err
    versions = mlflow.MlflowClient().search_model_versions("name = 'mnist-cnn'")
    assert len(versions) == 1


def start_tune(project, study_file) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "digitune", "tune", "--study", str(study_file)],
        cwd=project,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def pid_of(trial) -> int | None:
    """The pid of the process that ran (or runs) a trial."""
    return (trial.user_attrs.get(studies.PROCESS_ATTR) or {}).get("pid")


def wait_for_a_trial_in_training(
    study_name: str, process: subprocess.Popen, in_a_worker: bool = False
) -> int:
    """Until a trial has reported an epoch (bounded: two minutes); returns the pid of the
    process training it. `in_a_worker`: a worker process's trial, not the launcher's."""
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no trial started training within two minutes"
        try:
            study = optuna.load_study(
                study_name=study_name, storage=config.default_storage(study_name)
            )
            for trial in study.get_trials(states=(TrialState.RUNNING,)):
                pid = pid_of(trial)
                if trial.intermediate_values and pid and not (in_a_worker and pid == process.pid):
                    return pid
        except KeyError:
            pass  # The study is not created yet.
        time.sleep(0.2)


def assert_nothing_left_running(study: optuna.Study) -> None:
    """No Optuna trial and no MLflow run of the study is RUNNING."""
    assert [t.number for t in study.trials if t.state == TrialState.RUNNING] == []
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []


def test_a_killed_tune_s_trial_is_retried_by_a_rerun_within_the_grace_period(project):
    study_file = write_study(project, CRASHABLE_STUDY)
    worker = start_tune(project, study_file)
    wait_for_a_trial_in_training("tiny", worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    storage = config.default_storage("tiny")
    killed = optuna.load_study(study_name="tiny", storage=storage).trials[0]
    assert killed.state == TrialState.RUNNING  # Nobody could say otherwise yet.

    # At once, well within the 3 s grace period: the trial's process is known dead.
    outcome = optuna_search.run(study_file)

    trials = outcome.study.trials
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == trials[0].params
    # The retry takes the killed trial's place: the study still ran its two trials.
    assert [t.state for t in trials[1:]] == [t.state for t in trials[1:] if t.state in DONE]
    assert len(trials) == 3 and studies.count(outcome.study) == 2
    run = mlflow.get_run(killed.user_attrs[tracking.TRIAL_RUN_ATTR])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "FAIL"
    assert f"its worker process {worker.pid} on" in run.data.tags["fail_reason"]
    assert_one_parent_with_a_child_per_trial(outcome.study)
    assert_nothing_left_running(outcome.study)


def test_a_worker_killed_mid_trial_has_its_trial_retried_and_tune_says_so(project):
    study_file = write_study(
        project, CRASHABLE_STUDY.replace("n_trials = 2", "n_trials = 3\nworkers = 2")
    )
    launcher = start_tune(project, study_file)
    victim = wait_for_a_trial_in_training("tiny", launcher, in_a_worker=True)
    os.kill(victim, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=300)

    # The study finished with the other worker, and the command says what happened.
    assert launcher.returncode == 1, output
    assert f"(process {victim}) was killed by SIGKILL" in output
    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    killed = [t for t in study.trials if pid_of(t) == victim]
    assert [t.state for t in killed] == [TrialState.FAIL]
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert pid_of(retries[0]) != victim
    tracking.configure(create=True)
    assert_nothing_left_running(study)
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-cnn'")) == 1


def test_sigterm_stops_every_worker_cleanly_like_ctrl_c(project):
    study_file = write_study(
        project, CRASHABLE_STUDY.replace("n_trials = 2", "n_trials = 2\nworkers = 2")
    )
    launcher = start_tune(project, study_file)
    wait_for_a_trial_in_training("tiny", launcher, in_a_worker=True)
    launcher.send_signal(signal.SIGTERM)  # To the launcher alone, as `docker stop` does.
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, output
    assert "SIGTERM: stopping after this batch" in output
    assert "interrupted: every finished trial is saved" in output
    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    assert study.trials and all(t.state == TrialState.FAIL for t in study.trials)
    client = tracking.configure(create=True)
    assert client.get_run(study.user_attrs[tracking.PARENT_RUN_ATTR]).info.status == "KILLED"
    assert_nothing_left_running(study)


def test_joining_before_the_parent_run_exists_is_a_clear_error(project, monkeypatch, capsys):

    monkeypatch.setattr(studies, "PARENT_RUN_WAIT_SECONDS", 1.0)
    study_file = write_study(project, TINY_STUDY)
    # Created, as the first `make tune` does before it opens its MLflow parent run.
    optuna.create_study(study_name="tiny", storage=config.default_storage("tiny"))
    assert cli.main(["tune", "--study", str(study_file), "--join"]) == 1
    error = capsys.readouterr().err
    assert "study 'tiny' has no MLflow parent run after 1 s" in error


def test_ctrl_c_stops_cleanly_and_the_study_resumes(project):
    study_file = write_study(project, CRASHABLE_STUDY)
    worker = start_tune(project, study_file)
    wait_for_a_trial_in_training("tiny", worker)
    worker.send_signal(signal.SIGINT)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 130, output
    assert "interrupted: every finished trial is saved" in output

    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    client = tracking.configure(create=True)
    interrupted = client.get_run(study.trials[0].user_attrs[tracking.TRIAL_RUN_ATTR])
    assert interrupted.info.status == "KILLED"
    parent = client.get_run(study.user_attrs[tracking.PARENT_RUN_ATTR])
    assert parent.info.status == "KILLED"

    outcome = optuna_search.run(study_file)
    assert len(outcome.study.trials) == 2
    assert outcome.study.trials[1].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert mlflow.get_run(parent.info.run_id).info.status == "FINISHED"


def test_join_adds_trials_to_a_running_study_without_registering(project, postgres_url):
    study_file = write_study(project, TINY_STUDY.replace("n_trials = 3", "n_trials = 2"))
    first = optuna_search.run(study_file, storage=postgres_url)
    assert optuna_search.run(study_file, storage=postgres_url, n_trials=4, join=True) is None

    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert len(study.trials) == 4
    assert (
        study.user_attrs[tracking.PARENT_RUN_ATTR]
        == first.study.user_attrs[tracking.PARENT_RUN_ATTR]
    )
    assert_one_parent_with_a_child_per_trial(study)
    # Registration belongs to the machine that started the study: still one version.
    assert len(mlflow.MlflowClient().search_model_versions("name = 'mnist-cnn'")) == 1


def test_four_workers_on_sqlite_lose_nothing_and_never_error(project, capfd):
    """Optuna's documentation warns about SQLite under parallel workers; with its busy
    timeout (study.make_storage) four workers on one file lose no trial and no run."""
    study_file = write_study(
        project, TINY_STUDY.replace("n_trials = 3", "n_trials = 8\nworkers = 4")
    )
    outcome = optuna_search.run(study_file)
    trials = outcome.study.trials
    assert len(trials) >= 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [
        t.user_attrs.get("fail_reason") for t in trials
    ]
    # Four processes ran; a slow starter may have found no trial left to take.
    assert len({t.user_attrs["worker"] for t in trials}) >= 3
    assert_one_parent_with_a_child_per_trial(outcome.study)
    printed = capfd.readouterr()
    assert "locked" not in printed.out + printed.err
    assert "Traceback" not in printed.err


def test_a_stale_trial_is_retried_while_mlflow_is_down_and_its_run_closed_later(
    project, monkeypatch
):
    """A worker on another machine stops sending heartbeats while MLflow cannot be reached:
    the retry must not wait for MLflow, and the trial's run is closed once it is back."""

    study_path = write_study(project, CRASHABLE_STUDY)  # Heartbeat 1 s, grace 3 s.
    client = tracking.configure(create=True)
    run = client.create_run(tracking.experiment_id(client, "tiny"), run_name="trial-0")
    optuna_study = studies.load_or_create(study_file.load(study_path), None)
    trial = optuna_study.ask()
    trial.suggest_float("learning_rate", 1e-3, 3e-3, log=True)
    trial.set_user_attr(studies.WORKER_ATTR, "another-machine:12345")
    trial.set_user_attr(tracking.TRIAL_RUN_ATTR, run.info.run_id)
    optuna_study._storage.record_heartbeat(trial._trial_id)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # MLflow is down.
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    # Once its heartbeat is older than the grace period, the trial is stale, and failed.
    deadline = time.monotonic() + 30
    while optuna_study.trials[0].state != TrialState.FAIL:
        assert time.monotonic() < deadline, "the stale trial was never failed"
        optuna.storages.fail_stale_trials(optuna_study)
        time.sleep(0.2)
    trials = optuna_study.trials
    assert trials[0].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.WAITING and retry.params == trials[0].params

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    client = tracking.configure(create=True)  # MLflow is back: the study's end closes the run.
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    studies.close_runs_of_failed_trials(optuna_study)
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["state"] == "FAIL"


def test_join_without_a_study_says_how_to_start_one(project, capsys):

    study_file = write_study(project, TINY_STUDY)
    assert cli.main(["tune", "--study", str(study_file), "--join"]) == 1
    error = capsys.readouterr().err
    assert "no study 'tiny'" in error and "make tune" in error


def start_tracking_server(port: int) -> subprocess.Popen:
    """`digitune mlflow-server` on the project's own store, in a session of its own."""
    server = subprocess.Popen(
        [sys.executable, "-m", "digitune", "mlflow-server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(f"http://127.0.0.1:{port}/health", process=server)
    return server


def test_an_mlflow_outage_mid_study_waits_and_loses_no_trial(project, monkeypatch):
    """The tracking server dies while a trial trains and comes back: the study waits for it,
    saying so, and every trial completes with its whole run; none is failed or repeated."""
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study_path = write_study(project, CRASHABLE_STUDY.replace("n_trials = 2", "n_trials = 3"))
    server = start_tracking_server(port)
    tune = start_tune(project, study_path)
    try:
        wait_for_a_trial_in_training("tiny", tune)
        # All of it: MLflow runs in a process group of its own under `digitune mlflow-server`.
        kill_session(server.pid)
        server.wait(timeout=60)
        time.sleep(8)  # Down for a while: trials try to log and cannot.
        server = start_tracking_server(port)
        output, _ = tune.communicate(timeout=300)

        assert tune.returncode == 0, output
        assert f"MLflow does not answer at http://127.0.0.1:{port}" in output
        assert "MLflow answers again after" in output
        assert "already active" not in output and "Traceback" not in output
        storage = config.default_storage("tiny")
        study = optuna.load_study(study_name="tiny", storage=storage)
        assert [t.state for t in study.trials if t.state == TrialState.FAIL] == []
        assert len(study.trials) == 3
        tracking.configure(create=True)
        assert_one_parent_with_a_child_per_trial(study)
        client = mlflow.MlflowClient()
        for trial in study.trials:
            run = client.get_run(trial.user_attrs[tracking.TRIAL_RUN_ATTR])
            assert run.info.status == "FINISHED"
            assert run.data.tags["state"] == trial.state.name
            # Every epoch's metrics, those logged during the outage too.
            history = client.get_metric_history(run.info.run_id, "val_accuracy")
            assert len(history) == len(trial.intermediate_values) > 0
            assert "trial_seconds" in run.data.metrics
        assert len(client.search_model_versions("name = 'mnist-cnn'")) == 1
    finally:
        tune.kill()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
