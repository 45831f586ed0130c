"""deploy/compose.yaml's topology, started as local processes: what proves that the commands in
the deployment files work, not only that the files parse.

A fresh PostgreSQL database for the study and one for MLflow; the MLflow server as compose.yaml
starts it (every interface, a password, artifacts in an S3 bucket that moto's server holds);
three workers whose commands and environment are read out of compose.yaml, started in random
order, staggered, each in a folder of its own (no shared disk), one of them killed mid-trial;
a fourth whose study file differs, refused; `register` from two processes at once; `promote`;
then `serve`, as compose.yaml starts it.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import (
    FIXTURE_DIR,
    POSTGRES,
    TINY_STUDY,
    command_lines,
    free_port,
    kill_session,
    wait_for,
)
from digitune import study as studies
from digitune import tracking

pytestmark = pytest.mark.slow

COMPOSE = Path(__file__).resolve().parents[1] / "deploy" / "compose.yaml"
# What deploy/.env would hold; none may show in a command line or a log.
CREDENTIALS = {
    "POSTGRES_PASSWORD": "pg-" + uuid.uuid4().hex[:12],
    "MINIO_ROOT_USER": "minio-" + uuid.uuid4().hex[:8],
    "MINIO_ROOT_PASSWORD": "s3-" + uuid.uuid4().hex[:16],
    "MLFLOW_ADMIN_PASSWORD": "mlflow-" + uuid.uuid4().hex[:12],
    "MLFLOW_SECRET_KEY": uuid.uuid4().hex,
}
# Trials long enough to be killed in the middle, workers that notice a dead one in seconds.
STUDY = (
    TINY_STUDY.replace("n_trials = 3", "n_trials = 6")
    .replace("max_epochs = 2", "max_epochs = 8\nearly_stopping_patience = 8")
    .replace("[training]", "heartbeat_seconds = 1\nheartbeat_grace_seconds = 4\n\n[training]")
    .replace("pruner_warmup_epochs = 0", 'pruner = "none"')
)


def interpolate(value: str, environment: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and ${NAME:?error}."""

    def replace(match: re.Match) -> str:
        if environment.get(match["name"]):
            return environment[match["name"]]
        assert match["operator"] != ":?", f"compose.yaml needs {match['name']}"
        return match["word"] or ""

    pattern = r"\$\{(?P<name>\w+)(?:(?P<operator>:-|:\?)(?P<word>[^}]*))?\}"
    return re.sub(pattern, replace, value)


class Topology:
    """compose.yaml's services as this machine's processes: each service's command and
    environment as the file gives them, its host names and ports mapped to local ones."""

    def __init__(self, folder: Path, variables: dict[str, str], hosts: dict[str, str]):
        self.folder, self.hosts = folder, hosts
        text = interpolate(COMPOSE.read_text(), variables)
        self.services = yaml.safe_load(text)["services"]
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []

    def local(self, value: str) -> str:
        for container, here in self.hosts.items():
            value = value.replace(container, here)
        return value

    def command(self, service: str, port: int | None = None) -> list[str]:
        """The service's command, run by this Python; `port`: the one it listens on here."""
        command = [self.local(str(part)) for part in self.services[service]["command"]]
        if port is not None:
            command[command.index("--port") + 1] = str(port)
        assert command[0] == "digitune"
        return [sys.executable, "-m", "digitune", *command[1:]]

    def environment(self, service: str, home: Path) -> dict[str, str]:
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("MLFLOW_", "DIGITUNE_", "AWS_"))
        }
        given = self.services[service].get("environment") or {}
        return {
            **inherited,
            **{key: self.local(str(value)) for key, value in given.items()},
            "DIGITUNE_HOME": str(home),
            "MNIST_DIR": str(FIXTURE_DIR),
        }

    def start(self, service: str, name: str, port=None, extra=()) -> subprocess.Popen:
        """The service's command in a folder of its own (a container's disk), its own session."""
        home = self.folder / name
        (home / "studies").mkdir(parents=True, exist_ok=True)
        log = home / "output.log"
        process = subprocess.Popen(
            [*self.command(service, port), *extra],
            cwd=home,
            env=self.environment(service, home),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process, log))
        return process

    def logs(self) -> dict[str, str]:
        return {name: log.read_text() for name, _, log in self.processes}

    def stop(self) -> None:
        for _, process, _ in self.processes:
            if process.poll() is None:
                kill_session(process.pid, signal.SIGKILL)
            process.wait(timeout=60)


@pytest.fixture
def databases():
    """Two fresh PostgreSQL databases, owned by compose.yaml's user `digitune`, as its
    PostgreSQL service makes them (`optuna`, and `mlflow` by its init script)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server at {POSTGRES}: {error}")
    if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'digitune'").fetchone():
        admin.execute("CREATE ROLE digitune LOGIN")
    names = {kind: f"digitune_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("optuna", "mlflow")}
    for name in names.values():
        admin.execute(f"CREATE DATABASE {name} OWNER digitune")
    yield names
    for name in names.values():
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_the_compose_topology_tunes_registers_and_serves(tmp_path, databases, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    address = urllib.parse.urlsplit(POSTGRES).netloc.rsplit("@", 1)[-1]
    s3_port, mlflow_port, serve_port = free_port(), free_port(), free_port()
    hosts = {f"postgres:5432/{kind}": f"{address}/{name}" for kind, name in databases.items()}
    hosts["http://minio:9000"] = f"http://127.0.0.1:{s3_port}"
    # By this machine's name, as `mlflow-server` tells workers on other machines to reach it:
    # MLflow refuses a Host header it does not know.
    hosts["http://mlflow:5000"] = f"http://{socket.gethostname()}:{mlflow_port}"
    study_path = tmp_path / "tiny.toml"
    study_path.write_text(STUDY)
    topology = Topology(tmp_path, {**CREDENTIALS, "STUDY": str(study_path)}, hosts)
    seen_command_lines: set[str] = set()

    def watch() -> None:
        seen_command_lines.update(command_lines())

    try:
        # The object store, and the bucket compose.yaml's `bucket` service makes.
        s3 = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            stdout=(tmp_path / "s3.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        topology.processes.append(("s3", s3, tmp_path / "s3.log"))
        wait_for(f"http://127.0.0.1:{s3_port}/moto-api/", process=s3)
        bucket = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3_port}",
            aws_access_key_id=CREDENTIALS["MINIO_ROOT_USER"],
            aws_secret_access_key=CREDENTIALS["MINIO_ROOT_PASSWORD"],
            region_name="us-east-1",
        )
        bucket.create_bucket(Bucket="mlflow")

        server = topology.start("mlflow", "mlflow", port=mlflow_port)
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", process=server, while_waiting=watch)
        printed = topology.logs()["mlflow"]
        assert f"MLFLOW_TRACKING_URI={hosts['http://mlflow:5000']}" in printed

        # Three workers, in random order, a few seconds apart; one is killed mid-trial.
        names = ["tuner-1", "tuner-2", "tuner-3"]
        random.shuffle(names)
        workers = {}
        for name in names:
            workers[name] = topology.start("tuner", name)
            time.sleep(random.uniform(0.5, 3.0))
            watch()
        storage = topology.environment("tuner", tmp_path)["DIGITUNE_STORAGE"]
        victim, killed_trial = wait_for_a_trial_in_training(storage, workers, watch)
        kill_session(workers[victim].pid, signal.SIGKILL)

        # A fourth worker whose study file has another max_epochs is refused, naming it.
        changed = tmp_path / "changed.toml"
        changed.write_text(STUDY.replace("max_epochs = 8", "max_epochs = 9"))
        refused = topology.start("tuner", "tuner-4", extra=["--study", str(changed)])
        assert refused.wait(timeout=300) == 1
        assert "[training] max_epochs is 8 in the study, 9 here" in topology.logs()["tuner-4"]

        for name, worker in workers.items():
            while worker.poll() is None:
                watch()
                time.sleep(1)
            assert worker.returncode == (-signal.SIGKILL if name == victim else 0), topology.logs()[
                name
            ][-3000:]

        study = optuna.load_study(study_name="tiny", storage=storage)
        trials = study.trials
        assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        # The killed trial was failed and run again, by another worker, in its place.
        failed = [t for t in trials if t.state == TrialState.FAIL]
        assert [t.number for t in failed] == [killed_trial]
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed_trial]
        assert retry.state == TrialState.COMPLETE and retry.params == failed[0].params
        assert retry.user_attrs[studies.WORKER_ATTR] != failed[0].user_attrs[studies.WORKER_ATTR]
        assert studies.count(study) == 6
        # No configuration ran twice, but for the retry.
        configurations = [tuple(sorted(t.params.items())) for t in trials if t is not failed[0]]
        assert len(set(configurations)) == len(configurations)

        # Registration from two processes at once: one version.
        registering = [topology.start("register", f"register-{i}") for i in (1, 2)]
        for process in registering:
            assert process.wait(timeout=300) == 0, topology.logs()
        client_environment = topology.environment("register", tmp_path)
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, client_environment[key])
        mlflow.set_tracking_uri(client_environment["MLFLOW_TRACKING_URI"])
        client = mlflow.MlflowClient()
        versions = client.search_model_versions("name = 'mnist-cnn'")
        assert [v.version for v in versions] == ["1"]
        assert versions[0].tags["trial"] == str(study.best_trial.number)
        assert client.get_model_version_by_alias("mnist-cnn", "challenger").version == "1"
        # One parent run, kept by every worker, a child run per trial.
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        (parent,) = [r for r in runs if r.data.tags.get("digitune.role") == "study"]
        assert study.user_attrs[tracking.PARENT_RUN_ATTR] == parent.info.run_id
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == len(trials)

        # The MLflow UI, opened by this machine's name, may search the runs: its requests
        # carry that origin, which MLflow refused as cross-origin (403) by default.
        ui = client_environment["MLFLOW_TRACKING_URI"]
        password = client_environment["MLFLOW_TRACKING_PASSWORD"]
        search = urllib.request.Request(
            f"{ui}/ajax-api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment.experiment_id]}).encode(),
            headers={
                "Origin": ui,
                "Content-Type": "application/json",
                "Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode(),
            },
        )
        with urllib.request.urlopen(search, timeout=30) as answer:
            assert len(json.loads(answer.read())["runs"]) == len(runs)

        # Every artifact is in the bucket; no process wrote one to its own disk.
        stored = [
            entry["Key"]
            for page in bucket.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for entry in page.get("Contents", [])
        ]
        assert any(key.endswith(".keras") for key in stored), stored[:20]
        assert any("weights" in key for key in stored), stored[:20]
        local = [p for p in tmp_path.rglob("*") if "artifacts" in p.parts or p.suffix == ".keras"]
        assert local == []

        # Promote, as a user would (compose.yaml: `run --rm register digitune promote`).
        promoting = subprocess.run(
            [sys.executable, "-m", "digitune", "promote"],
            env=topology.environment("register", tmp_path),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert promoting.returncode == 0, promoting.stdout + promoting.stderr
        (tmp_path / "promote.log").write_text(promoting.stdout + promoting.stderr)
        serve = topology.start("serve", "serve", port=serve_port)
        wait_for(f"http://127.0.0.1:{serve_port}/health", process=serve, while_waiting=watch)
        image = np.zeros((28, 28), np.uint8)
        image[6:22, 13:15] = 255  # A one.
        answer = predict(serve_port, image)
        assert answer["version"] == "1" and answer["predictions"][0]["class_name"] in "0123456789"

        # No credential in any process's command line or in anything printed.
        watch()
        for key, value in CREDENTIALS.items():
            assert not any(value in line for line in seen_command_lines), key
            for name, text in topology.logs().items():
                # The object store logs the access key id of each request (its user name),
                # as S3's access logs do; never its secret.
                if (name, key) != ("s3", "MINIO_ROOT_USER"):
                    assert value not in text, (name, key)
    finally:
        topology.stop()
        mlflow.set_tracking_uri(None)


def wait_for_a_trial_in_training(storage: str, workers: dict, watch) -> tuple[str, int]:
    """The name of a worker with a trial that has reported an epoch, and that trial's number."""
    pids = {worker.pid: name for name, worker in workers.items()}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        watch()
        try:
            study = optuna.load_study(study_name="tiny", storage=storage)
        except KeyError:
            time.sleep(0.5)
            continue  # Not created yet.
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            pid = (trial.user_attrs.get(studies.PROCESS_ATTR) or {}).get("pid")
            if trial.intermediate_values and pid in pids:
                return pids[pid], trial.number
        time.sleep(0.2)
    raise AssertionError("no trial trained an epoch within four minutes")


def predict(port: int, image: np.ndarray) -> dict:
    """`POST /predict` of one image as JSON, as a client of the service sends it."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict",
        data=json.dumps({"image": image.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())
