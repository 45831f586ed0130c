"""Shared fixtures: a real MNIST subset and a throw-away project folder per test."""

from __future__ import annotations

import fcntl
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "mnist-subset"
# The real MNIST, laid beside the checkout here and in CI; tests that need it skip otherwise.
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One computing thread for each test process and the processes it starts (TensorFlow reads
# these when it starts its runtime, XLA its flags): the test processes already keep every
# core busy, and threads that fight over the cores of the others only slow every test down.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


# PostgreSQL: the server named by DIGITUNE_TEST_POSTGRES (default: postgres at 127.0.0.1:5432,
# trust authentication, as `.ci/run` makes sure of).
POSTGRES = os.environ.get("DIGITUNE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for this test, dropped after it; skips when no server
    answers."""
    psycopg = pytest.importorskip("psycopg")
    name = f"digitune_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL server at {POSTGRES}: {error}")
    admin.execute(f"CREATE DATABASE {name}")
    yield POSTGRES.rsplit("/", 1)[0] + f"/{name}"
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


@pytest.fixture(autouse=True)
def outside_the_checkout(tmp_path_factory, monkeypatch):
    """A test that names no project folder gets a fresh one: what a project keeps (decoded
    folders in data/folders/, stores) never lands in the checkout."""
    if not os.environ.get("DIGITUNE_HOME"):
        monkeypatch.setenv("DIGITUNE_HOME", str(tmp_path_factory.mktemp("home")))


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
    use_project(monkeypatch, tmp_path)
    (tmp_path / "studies").mkdir()
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def use_project(patch: pytest.MonkeyPatch, home: Path) -> Path:
    """Point this process at the project folder `home`: its own studies/ and MLflow store,
    and the MNIST fixture."""
    patch.setenv("DIGITUNE_HOME", str(home))
    patch.setenv("MNIST_DIR", str(FIXTURE_DIR))
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command_lines(session: int | None = None) -> list[str]:
    """The command lines of this machine's processes, as `ps` shows them; with `session`,
    only those of that session (a server started with start_new_session, and all it
    started)."""
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and session in (None, os.getsid(int(entry.name))):
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # Gone meanwhile.
    return lines


def kill_session(session: int, number: int = 9) -> None:
    """Send signal `number` to every process of a session (a server started with
    start_new_session and all it started, whatever process groups they are in), as a
    crash or the OOM killer would take the whole server."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                os.kill(int(entry.name), number)
        except OSError:
            continue  # Gone meanwhile.


def wait_for(url: str, accept=None, process=None, seconds: float = 120.0, while_waiting=None):
    """Poll `url` until `accept(status, body)` (by default: it answers 200) and return the
    answer, failing once `process` (if any) has died or `seconds` have passed."""
    accept = accept or (lambda status, body: status == 200)
    deadline = time.monotonic() + seconds
    while True:
        if while_waiting is not None:
            while_waiting()
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        except OSError:
            status, body = None, b""  # not listening yet
        if status is not None and accept(status, body):
            return status, body
        assert process is None or process.poll() is None, f"{url}: the server stopped"
        assert time.monotonic() < deadline, f"{url}: no answer as expected in {seconds:.0f} s"
        time.sleep(0.2)


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
# Pinned, as the pruner's settings above are: the same figures on every machine, whatever
# precision "auto" would pick there. Tests about precision replace it.
precision = "float32"

[space]
learning_rate = { type = "float", low = 1e-3, high = 3e-3, log = true }
batch_size = 64
num_filters = { type = "int", low = 8, high = 16, step = 8 }
dense_units = 32
dropout_rate = { type = "float", low = 0.0, high = 0.3 }
"""


def register_trained_cnn(params: dict, epochs: int, study_name: str):
    """Train a small real CNN on the fixture (seed 0) and register it in the configured
    MLflow store as @champion; returns (the Keras model, the model version)."""
    import keras

    from digitune import config, data, model, registry, tracking
    from digitune.data import mnist

    split = data.split(mnist.load_folder(FIXTURE_DIR))
    keras.utils.set_random_seed(0)
    cnn = model.build_model(params)
    cnn.fit(split.x_train, split.y_train, batch_size=32, epochs=epochs, verbose=0)
    client = tracking.configure(create=True)
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, study_name)):
        version = registry.register(
            cnn,
            study_name=study_name,
            trial_number=0,
            params=params,
            validation_accuracy=0.0,
            test_accuracy=0.0,
            test_images=300,
            data_sha256="0" * 64,
            alias=config.CHAMPION_ALIAS,
        )
    return cnn, version


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory, worker_id) -> Path:
    """A folder of this test run that every xdist worker sees (the run's own temporary
    folder), for what is built once and only read afterwards."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def champion_home(shared_folder) -> Path:
    """A project folder whose MLflow store holds mnist-cnn version 1 as @champion: a small
    real CNN trained on the fixture. Tests point DIGITUNE_HOME here to serve it, or copy its
    store; none writes to it, so the first worker to need it builds it for all."""
    home = shared_folder / "champion"
    with open(shared_folder / "champion.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other workers wait here until it is built
        if not (home / "built").exists():
            home.mkdir(exist_ok=True)
            params = {"num_conv_blocks": 2, "num_filters": 16, "dense_units": 64}
            with pytest.MonkeyPatch.context() as patch:
                use_project(patch, home)
                register_trained_cnn({**params, "dropout_rate": 0.2}, 12, study_name="served")
                mlflow.set_tracking_uri(None)
            (home / "built").touch()
    return home


@pytest.fixture
def serving(champion_home, monkeypatch):
    """The project whose champion is served, as the environment of this test."""
    yield use_project(monkeypatch, champion_home)
    mlflow.set_tracking_uri(None)
