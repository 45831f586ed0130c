"""A password in a storage URL or tracking URI never shows: not in a printed line, an MLflow
param or tag, an HTTP answer, a child process's command line (what `ps` shows) or make's echo.

PostgreSQL here trusts local connections, so a URL with a password works against it as it
would against a server that checks the password.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from conftest import TINY_STUDY, command_lines, free_port, wait_for, write_study
from digitune import cli, config, serve
from test_serve import started

pytestmark = pytest.mark.slow

# `$` and `&` are what a shell or make would mangle.
PASSWORD = "Hunter2$&x"
# MLflow's basic-auth app asks for 12 characters at least.
ADMIN_PASSWORD = PASSWORD + "-and-more"
REPOSITORY = Path(__file__).resolve().parents[1]


def with_password(url: str) -> str:
    return url.replace("://postgres@", f"://postgres:{PASSWORD}@", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql://postgres:Hunter2$&x@127.0.0.1:5432/db",
            "postgresql://postgres:***@127.0.0.1:5432/db",
        ),
        (
            "cannot reach http://alice:p@ss@tracking.internal:5000/api: refused",
            "cannot reach http://alice:***@tracking.internal:5000/api: refused",
        ),
        (
            "postgresql+psycopg://u:pw@h/db?sslmode=require",
            "postgresql+psycopg://u:***@h/db?sslmode=require",
        ),
        ("host=h user=u password=pw dbname=d", "host=h user=u password=*** dbname=d"),
        (
            "sqlite:////tmp/x.db and http://127.0.0.1:5000",
            "sqlite:////tmp/x.db and http://127.0.0.1:5000",
        ),
        ("postgresql://postgres@127.0.0.1/db", "postgresql://postgres@127.0.0.1/db"),
        ("models:/mnist-cnn@champion", "models:/mnist-cnn@champion"),
        # A token alone is an HTTP URL's credential.
        ("push to https://ghp_T0KEN@git.internal/x", "push to https://***@git.internal/x"),
        ("HTTP://tok@h:5000/api", "HTTP://***@h:5000/api"),
        # Passwords with spaces, in a URL and quoted in a connection string.
        ("postgresql://u:pass word@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("host=h password='pass word' user=u", "host=h password=*** user=u"),
        ('password = "it\'s a secret" host=h', "password = *** host=h"),
        # A port is not a password, whatever follows it.
        ("http://h:5000 failed; mail ops@corp", "http://h:5000 failed; mail ops@corp"),
    ],
)
def test_redact_hides_only_passwords(text, expected):
    assert config.redact(text) == expected


def test_errors_about_a_credentialed_storage_never_print_the_password(
    project, postgres_url, monkeypatch, capfd
):
    study_file = write_study(project, TINY_STUDY)
    # Given on the command line, and through the variable the Makefile uses.
    assert (
        cli.main(["report", "--study", str(study_file), "--storage", with_password(postgres_url)])
        == 1
    )
    monkeypatch.setenv("DIGITUNE_STORAGE", with_password(postgres_url))
    assert cli.main(["tune", "--study", str(study_file), "--join"]) == 1
    out, err = capfd.readouterr()
    assert PASSWORD not in out + err
    assert err.count("in postgresql://postgres:***@127.0.0.1:5432/") == 2, err


def test_a_tune_on_a_credentialed_storage_keeps_the_password_out_of_everything(
    project, postgres_url
):
    study_file = write_study(project, TINY_STUDY.replace("n_trials = 3", "n_trials = 2"))
    environment = {**os.environ, "DIGITUNE_STORAGE": with_password(postgres_url)}
    command = [
        sys.executable,
        "-m",
        "digitune",
        "tune",
        "--study",
        str(study_file),
        "--workers",
        "2",
    ]
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    leaked = []
    while process.poll() is None:
        leaked += [line for line in command_lines() if PASSWORD in line]
        time.sleep(0.2)
    printed = process.stdout.read()
    assert process.returncode == 0, printed
    assert leaked == []
    assert PASSWORD not in printed
    # The study went to PostgreSQL: the URL arrived whole.
    trials = optuna.load_study(study_name="tiny", storage=postgres_url).trials
    assert len(trials) == 2
    client = mlflow.MlflowClient(config.local_tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 3  # The parent and a run per trial.
    for run in runs:
        recorded = " ".join(map(str, [*run.data.params.values(), *run.data.tags.values()]))
        assert PASSWORD not in recorded


def test_a_credentialed_tracking_uri_that_is_down_is_reported_without_its_password(
    project, monkeypatch, capfd
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert cli.main(["models"]) == 1
    err = capfd.readouterr().err
    assert "cannot reach the MLflow tracking store http://alice:***@127.0.0.1:9" in err
    assert PASSWORD not in err
    with started(serve.create_app(poll_seconds=0)) as client:  # Once the load was tried.
        answer = client.get("/health")
    assert answer.status_code == 503
    assert "alice:***@127.0.0.1:9" in answer.json()["detail"]
    assert PASSWORD not in answer.text


@contextlib.contextmanager
def tracking_server(port: int, environment: dict, secret: str, *arguments: str):
    """`digitune mlflow-server --port PORT ARGUMENTS` with `environment`, in a session of its
    own, until the block ends (then SIGTERM). Yields a dict: `leaked`, the command lines of
    this machine that held `secret` while it started; `printed`, all it printed, once done."""
    server = subprocess.Popen(
        [sys.executable, "-m", "digitune", "mlflow-server", "--port", str(port), *arguments],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = {"leaked": [], "printed": ""}
    try:
        wait_for(
            f"http://127.0.0.1:{port}/health",
            process=server,
            while_waiting=lambda: seen["leaked"].extend(
                line for line in command_lines() if secret in line
            ),
        )
        yield seen
    finally:
        os.killpg(server.pid, 15)
        seen["printed"] = server.communicate(timeout=60)[0]


def test_the_mlflow_server_gets_its_store_password_through_the_environment(project, postgres_url):
    port = free_port()
    environment = {**os.environ, "MLFLOW_BACKEND_STORE_URI": with_password(postgres_url)}
    with tracking_server(port, environment, PASSWORD) as server:
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        client.create_experiment("through-the-server")
    leaked, printed = server["leaked"], server["printed"]
    assert leaked == []
    assert PASSWORD not in printed
    assert "with the store postgresql://postgres:***@127.0.0.1:5432/" in printed
    # The server kept its runs in PostgreSQL, so it had the whole URL.
    store = mlflow.MlflowClient(postgres_url)
    assert store.get_experiment_by_name("through-the-server") is not None


def test_make_passes_a_password_with_dollar_and_ampersand_without_echoing_it(project, postgres_url):
    study_file = write_study(project, TINY_STUDY)
    environment = {**os.environ, "DIGITUNE_HOME": str(project)}
    environment.pop("MAKEFLAGS", None)
    finished = subprocess.run(
        [
            "make",
            "-C",
            str(REPOSITORY),
            "report",
            f"STUDY={study_file}",
            f"STORAGE={with_password(postgres_url)}",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    printed = finished.stdout + finished.stderr
    assert PASSWORD not in printed
    # digitune got the whole URL: it looked in that database, and found no study there.
    assert "no study 'tiny' in postgresql://postgres:***@127.0.0.1:5432/" in printed, printed


TOKEN_URL = "https://S3CR3T-T0KEN@tracking.internal/api"
SPACED_URL = "postgresql://u:pass word@db.internal/x"


def test_a_failing_trial_s_reason_is_redacted_everywhere_it_is_kept(project, monkeypatch, capfd):
    """The error of a failing trial quotes credentialed URLs: its fail_reason in Optuna and
    MLflow, Optuna's own warning with the traceback, and the trial's line hide them."""
    from digitune import trainer

    def unreachable(*args, **kwargs):
        raise ConnectionError(f"cannot reach {TOKEN_URL} nor {SPACED_URL}")

    monkeypatch.setattr(trainer, "fit", unreachable)
    study_file = write_study(project, TINY_STUDY.replace("n_trials = 3", "n_trials = 1"))
    assert cli.main(["tune", "--study", str(study_file)]) == 1  # No trial completed.
    printed = "".join(capfd.readouterr())
    assert "S3CR3T" not in printed and "pass word" not in printed
    assert "https://***@tracking.internal" in printed  # Optuna's warning, redacted.
    (trial,) = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny")).trials
    reason = trial.user_attrs["fail_reason"]
    assert reason == (
        "ConnectionError: cannot reach https://***@tracking.internal/api "
        "nor postgresql://u:***@db.internal/x"
    )
    client = mlflow.MlflowClient(config.local_tracking_uri())
    (run,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.state = 'FAIL'"
    )
    assert run.data.tags["fail_reason"] == reason


def test_a_worker_s_plain_log_handler_prints_redacted_lines_and_tracebacks():
    """What a worker process sets up (a plain handler on stdout), run in a fresh process: the
    message and the traceback of a logged error both come out redacted."""
    script = f"""
import logging, sys
from digitune import config
config.redact_every_log_record()
handler = logging.StreamHandler(sys.stdout)
handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
logging.getLogger().addHandler(handler)
try:
    raise OSError("store {TOKEN_URL} is down")
except OSError:
    logging.getLogger("mlflow.store").exception("request to %s failed", "{SPACED_URL}")
"""
    printed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert "mlflow.store: request to postgresql://u:***@db.internal/x failed" in printed
    assert "OSError: store https://***@tracking.internal/api is down" in printed
    assert "S3CR3T" not in printed and "pass word" not in printed


def test_the_tracking_server_with_auth_asks_every_client_for_a_password(project):
    """`digitune mlflow-server --auth`: a client without credentials is refused, one with
    them (MLflow's own variables) tracks; the admin's password is in no command line and
    no printed line. Without the password on a first start it says how to give it."""
    import base64
    import urllib.error
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "digitune", "mlflow-server", "--port", str(port), "--auth"]
    refused = subprocess.run(
        command,
        env={**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": "short"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "12 characters at least" in refused.stderr
    assert not (project / "mlruns" / "basic_auth.db").exists()

    search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
    environment = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    with tracking_server(port, environment, ADMIN_PASSWORD, "--auth") as server:
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(search, timeout=30)
        assert anonymous.value.code == 401
        credentials = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
        signed_in = urllib.request.Request(
            search, headers={"Authorization": f"Basic {credentials}"}
        )
        with urllib.request.urlopen(signed_in, timeout=30) as answer:
            assert answer.status == 200
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
            assert client.get_experiment(client.create_experiment("signed-in")).name == "signed-in"
    leaked, printed = server["leaked"], server["printed"]
    assert leaked == []
    assert ADMIN_PASSWORD not in printed
    assert "asking every client for a user and password" in printed
    assert (project / "mlruns" / "basic_auth.db").exists()
