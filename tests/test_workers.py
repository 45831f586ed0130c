"""What lets workers on many machines share one study without a coordinator: who a worker is,
what the database decides when several claim one thing at once, and the study's fingerprint.
Nothing here trains; test_topology.py runs workers for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import optuna
import pytest

from conftest import TINY_STUDY, write_study
from digitune import config, study_file
from digitune import study as studies

# Processes that start at the same instant (a shared time.time()), each doing `action` on the
# study named by the storage, and printing what it got.
AT_ONCE = """
import json, pathlib, sys, time
import mlflow, optuna
from digitune import config, study, study_file, tracking
storage, barrier, action, value = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
definition = study_file.load(sys.argv[5])
if action == "experiment":  # The store opened before the barrier: only the create races.
    client = mlflow.MlflowClient(storage)
    client.search_experiments()
# A barrier: every process is ready (imports done) before any goes.
(barrier / value).touch()
while len(list(barrier.iterdir())) < int(sys.argv[6]):
    time.sleep(0.01)
if action == "storage":  # A fresh database: every process creates Optuna's tables.
    study.make_storage(storage, definition.study)
    print(json.dumps("ok"))
elif action == "experiment":  # An MLflow store without the study's experiment.
    print(json.dumps(tracking.experiment_id(client, "tiny")))
else:
    found = optuna.load_study(study_name="tiny", storage=storage)
    print(json.dumps(study.claim(found, "winner", value)))
"""


def at_once(storage: str, action: str, count: int, study_path, folder) -> list:
    """What `count` processes doing `action` at the same instant got."""
    barrier = folder / f"barrier-{action}"
    barrier.mkdir()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                AT_ONCE,
                storage,
                barrier,
                action,
                f"p{i}",
                study_path,
                str(count),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow  # Processes that load Optuna and MLflow: seconds each.
@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_of_processes_claiming_at_once_exactly_one_wins(project, storage, request):
    url = (
        request.getfixturevalue("postgres_url")
        if storage == "postgresql"
        else config.default_storage("tiny")
    )
    path = write_study(project, TINY_STUDY)
    # Four processes create the tables of a fresh database at once: none fails.
    assert at_once(url, "storage", 4, str(path), project) == ["ok"] * 4
    optuna.create_study(study_name="tiny", storage=url)
    winners = at_once(url, "claim", 4, str(path), project)
    assert len(set(winners)) == 1 and winners[0] in {f"p{i}" for i in range(4)}
    found = optuna.load_study(study_name="tiny", storage=url)
    assert found.user_attrs["winner"] == winners[0]
    # Once claimed, it stays: a later claim gets the winner's value; replacing it takes the
    # value it replaces, and only that one.
    assert studies.claim(found, "winner", "late") == winners[0]
    assert studies.claim(found, "winner", "new", replacing="not it") == winners[0]
    assert studies.claim(found, "winner", "new", replacing=winners[0]) == "new"


@pytest.mark.slow
def test_workers_starting_together_make_one_mlflow_experiment_and_all_use_it(project):
    store = f"sqlite:///{project / 'mlruns' / 'race.db'}"
    (project / "mlruns").mkdir(exist_ok=True)
    mlflow.MlflowClient(store).search_experiments()  # The store's tables, made beforehand.
    path = write_study(project, TINY_STUDY)
    made = at_once(store, "experiment", 4, str(path), project)
    named = mlflow.MlflowClient(store).get_experiment_by_name("tiny")
    assert made == [named.experiment_id] * 4


def test_a_worker_is_known_dead_only_where_its_process_table_can_tell(project):
    here = studies.this_process()
    assert here["pid"] == os.getpid() and here["boot"] and here["pid_namespace"]
    assert studies._gone(here) is False  # This very process.
    # The pid reused by a later process: another start time, so the worker is gone.
    assert studies._gone({**here, "started": "1"}) is True
    # A process that ended, on this machine.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = {**here, "pid": ended.pid, "started": "1"}
    assert studies._gone(gone) is True
    # Another container (its own pid namespace) or another boot: only heartbeats can tell.
    assert studies._gone({**gone, "pid_namespace": "pid:[1]"}) is False
    assert studies._gone({**gone, "boot": "another-machine"}) is False
    assert studies._gone(None) is False  # A worker that predates this record.


def test_every_process_is_a_worker_of_its_own(project):
    me = studies.worker_id()
    host, pid, token = me.split(":")
    assert int(pid) == os.getpid() and len(token) == 12 and studies.worker_id() == me
    other = subprocess.run(
        [sys.executable, "-c", "from digitune import study; print(study.worker_id())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert other.split(":")[0] == host and other != me


def test_a_worker_whose_study_file_differs_is_refused_naming_the_key(project):
    path = write_study(project, TINY_STUDY)
    definition = study_file.load(path)
    first = studies.fingerprint(definition, "a" * 64)
    studies.load_or_create(definition, None, fingerprint=first)
    # The same settings from another copy of the file, a budget aside: welcome.
    moved = write_study(project, TINY_STUDY.replace("n_trials = 3", "n_trials = 9"), "copy.toml")
    again = study_file.load(moved)
    studies.load_or_create(again, None, fingerprint=studies.fingerprint(again, "a" * 64))
    # Another setting, other data, another digitune: each refused, saying what differs.
    changed = write_study(project, TINY_STUDY.replace("max_epochs = 2", "max_epochs = 5"), "x.toml")
    other = study_file.load(changed)
    with pytest.raises(ValueError, match=r"\[training\] max_epochs is 2 in the study, 5 here"):
        studies.load_or_create(other, None, fingerprint=studies.fingerprint(other, "a" * 64))
    with pytest.raises(ValueError, match=r"its data has SHA-256 aaaa.*this worker's bbbb"):
        studies.load_or_create(
            definition, None, fingerprint=studies.fingerprint(definition, "b" * 64)
        )
    newer = {**first, "digitune": "99.0"}
    with pytest.raises(ValueError, match=r"digitune .* started it and this is 99.0"):
        studies.load_or_create(definition, None, fingerprint=newer)


def test_a_worker_whose_builder_module_differs_is_refused_naming_it(project):
    # The study file names the builder; the code that builds is the module's, on each machine.
    module = project / "worker_nets.py"
    module.write_text(
        "def build(params, input_shape, num_classes):\n    raise NotImplementedError\n\n"
        'build.hyperparameters = {"width": {"default": 8, "low": 1, "high": 64}}\n'
    )
    sys.modules.pop("worker_nets", None)
    text = TINY_STUDY.split("[space]")[0] + (
        '[model]\nbuilder = "worker_nets:build"\n\n'
        '[space]\nwidth = { type = "int", low = 4, high = 16 }\n'
    )
    definition = study_file.load(write_study(project, text))
    first = studies.fingerprint(definition, "a" * 64)
    studies.load_or_create(definition, None, fingerprint=first)
    # The same module: welcome. Another version of it on this machine: refused, naming it.
    studies.load_or_create(definition, None, fingerprint=studies.fingerprint(definition, "a" * 64))
    module.write_text(module.read_text().replace('"high": 64', '"high": 32'))
    with pytest.raises(ValueError, match=r"the module of its builder worker_nets:build differs"):
        studies.load_or_create(
            definition, None, fingerprint=studies.fingerprint(definition, "a" * 64)
        )
