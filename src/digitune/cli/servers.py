"""The tracking stage's servers: mlflow-server, which workers on several machines share, and
ui, the MLflow UI on the project's own store.

Both run MLflow's server in a process group of its own, with its store (and any password in
it) given through the environment, and pass SIGTERM and Ctrl-C on to all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from digitune import config
from digitune.cli import models


def add_commands(commands) -> None:
    server = commands.add_parser(
        "mlflow-server", help="an MLflow tracking server that workers on several machines share"
    )
    models.address_arguments(server, 5000, "the tracking server")
    server.add_argument(
        "--backend-store-uri",
        default=config.backend_store_uri(),
        help="SQL database of runs (default: MLFLOW_BACKEND_STORE_URI, else the project's "
        "SQLite store in mlruns/); prefer the variable when the URI holds a password",
    )
    server.add_argument(
        "--artifacts-destination",
        default=None,
        help="where the server keeps every run's files and models, which clients send through "
        "it: a folder, or s3://bucket/path (credentials from the environment only: "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; MLFLOW_S3_ENDPOINT_URL for MinIO or "
        "another S3-compatible store) (default: mlruns/artifacts)",
    )
    server.add_argument(
        "--allowed-hosts",
        default="",
        help="more names clients reach the server by, comma-separated (a Compose or Kubernetes "
        "service's name): MLflow answers 403 to any other Host, against DNS rebinding; this "
        "machine's own names, localhost and private addresses are always allowed",
    )
    server.add_argument(
        "--auth",
        action="store_true",
        help="ask every client for a user name and password (MLflow's basic-auth app; users in "
        "mlruns/basic_auth.db, the admin's password from MLFLOW_AUTH_ADMIN_PASSWORD on the "
        "first start; clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)",
    )
    server.set_defaults(handler=_mlflow_server, backend="none")

    ui = commands.add_parser("ui", help="start the MLflow UI on the project's store")
    models.address_arguments(ui, 5000, "the MLflow UI")
    ui.set_defaults(handler=_ui, backend="none")


def _mlflow_server(args: argparse.Namespace) -> int:
    artifacts = args.artifacts_destination or str(config.mlruns_dir() / "artifacts")
    if artifacts.startswith("s3://"):
        problem = _s3_problem(artifacts)
        if problem:
            print(f"error: --artifacts-destination {artifacts}: {problem}", file=sys.stderr)
            return 2
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        # The server stores and serves artifacts itself, so workers need no shared disk and
        # no credentials of the object store.
        "--artifacts-destination",
        artifacts,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    settings = _reachable(args.allowed_hosts, args.port)
    if args.auth:
        users = config.mlruns_dir() / "basic_auth.db"
        if not users.exists() and config.mlflow_admin_password_length() < 12:
            print(
                "error: --auth: set MLFLOW_AUTH_ADMIN_PASSWORD to the admin's password, 12 "
                f"characters at least, for the first start (it creates {users}); never give "
                "it on a command line",
                file=sys.stderr,
            )
            return 2
        settings["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_settings(users))
        if not config.mlflow_secret_key_given():
            settings["MLFLOW_FLASK_SERVER_SECRET_KEY"] = _secret_key(users.with_suffix(".key"))
        command += ["--app-name", "basic-auth"]
    print(
        f"MLflow tracking server on http://{args.host}:{args.port} with the store "
        f"{config.redact(args.backend_store_uri)} and the artifacts in {artifacts}"
        + (", asking every client for a user and password" if args.auth else "")
    )
    if args.host in LOOPBACK:
        print(
            "  this machine only; for workers on other machines: --host 0.0.0.0 "
            "(make mlflow-server HOST=0.0.0.0)"
        )
    else:
        print(
            f"  on each worker machine: MLFLOW_TRACKING_URI=http://{_reachable_name(args.host)}"
            f":{args.port}"
            + (" with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if args.auth else "")
        )
        if not args.auth:
            print(
                f"warning: anyone who reaches port {args.port} of this machine can read and "
                "change every run and registered model; --auth (AUTH=1) asks for a password",
                file=sys.stderr,
            )
    return _call_with_store(command, args.backend_store_uri, settings)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _reachable_name(host: str) -> str:
    """The name other machines reach this one by, for a server listening on `host`."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def _names(extra: str) -> list[str]:
    """What clients may call this machine: its names, its addresses and `extra`'s names."""
    names = {socket.gethostname(), socket.getfqdn(), *filter(None, extra.split(","))}
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return sorted(names)


def _reachable(extra: str, port: int) -> dict[str, str]:
    """MLflow's own settings for a server that clients reach by this machine's names (or by
    `extra`'s). Its defences know only localhost and private addresses: a worker that reached
    it by name, as `mlflow-server` tells it to, got 403 ("Invalid Host header"), and the UI
    opened by name could not search runs (its requests "cross-origin"). Each setting the
    environment gives is kept as it is."""
    from mlflow.server import security_utils

    names = _names(extra)
    hosts = [pattern for name in names for pattern in (name, f"{name}:*")]
    origins = [f"{scheme}://{name}:{port}" for name in names for scheme in ("http", "https")]
    return {
        "MLFLOW_SERVER_ALLOWED_HOSTS": config.mlflow_allowed_hosts()
        or ",".join([*security_utils.get_default_allowed_hosts(), *hosts]),
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": config.mlflow_allowed_origins() or ",".join(origins),
    }


def _s3_problem(destination: str) -> str | None:
    """Why the server could not keep artifacts in the S3 bucket of `destination`, in words,
    or None when the bucket answers: found before MLflow starts, not at the first upload."""
    try:
        import boto3
        import botocore.exceptions
    except ModuleNotFoundError:
        return "S3 needs boto3: pip install 'digitune[s3]'"
    bucket = destination.removeprefix("s3://").split("/", 1)[0]
    endpoint = config.s3_endpoint_url()
    where = f"at {endpoint}" if endpoint else "on AWS (MLFLOW_S3_ENDPOINT_URL is not set)"
    try:
        boto3.client("s3", endpoint_url=endpoint).head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        return (
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        )
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            return f"there is no bucket '{bucket}' {where}; create it first"
        if code in ("403", "AccessDenied"):
            return f"the credentials in the environment may not use bucket '{bucket}' {where}"
        return f"bucket '{bucket}' {where}: {config.redact(str(error))}"
    except botocore.exceptions.BotoCoreError as error:
        return f"cannot reach the S3 store {where}: {config.redact(str(error))}"
    return None


def _secret_key(path: Path) -> str:
    """The project's own key for MLflow's CSRF tokens, made once and readable by its owner
    only; servers of one store on several machines share MLFLOW_FLASK_SERVER_SECRET_KEY."""
    import secrets

    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def _auth_settings(users: Path) -> Path:
    """The settings file of MLflow's basic-auth app, with its users beside the project's
    store: signed-in users may read, only the admin and those it grants may write."""
    users.parent.mkdir(parents=True, exist_ok=True)
    settings = users.with_suffix(".ini")
    settings.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{users}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return settings


def _ui(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port)]
    # MLflow 3 opens on its GenAI view; studies and their trials are on the model-training one.
    print(
        f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning"
        " (Ctrl-C stops it): a study is an experiment; sort its runs by best_val_accuracy to "
        "rank the trials"
    )
    return _call_with_store(command, config.tracking_uri())


def _call_with_store(command: list[str], store_uri: str, settings: dict | None = None) -> int:
    """Run MLflow's server with its store given through the environment, where a password in
    the URI stays out of the process list (`ps` shows every command line)."""
    environment = {**os.environ, "MLFLOW_BACKEND_STORE_URI": store_uri, **(settings or {})}
    # MLflow's job runner (8 Huey consumer processes, as many as the server's own) runs GenAI
    # jobs (scorers, prompt optimisation), which digitune's runs never submit: off unless the
    # environment asks for it, the server starts in about half the time and CPU.
    environment.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # MLflow's server starts uvicorn and its workers; a signal to this process alone used to
    # leave them all running, holding the port. They get a process group of their own, and
    # SIGTERM and SIGINT (Ctrl-C) are passed on to all of it.
    server = subprocess.Popen(command, env=environment, process_group=0)

    def pass_on(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    previous = {number: signal.signal(number, pass_on) for number in STOP_SIGNALS}
    try:
        returncode = server.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _stop_group(server)
    # Stopped by a signal it was passed: as a server stopped by hand, not a failure.
    return 0 if returncode in (-signal.SIGTERM, -signal.SIGINT) else returncode


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _stop_group(server: subprocess.Popen, seconds: float = 30) -> None:
    """Whatever of the server's process group is still running, stopped: asked first, then
    killed after `seconds`."""
    deadline = time.monotonic() + seconds
    for number in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, number)
        except ProcessLookupError:
            return  # None left.
        while time.monotonic() < deadline:
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        deadline = time.monotonic() + 5
