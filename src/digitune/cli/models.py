"""The registry and serving stage's commands: promote, rollback, models, gc, export, serve,
bench-serve, mlflow-server and ui.

Each handler imports what it runs when it runs, so that `digitune --help` answers without
loading TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from digitune import config


def add_commands(commands) -> None:
    promote = commands.add_parser(
        "promote", help="make the challenger champion if it is better on the test set"
    )
    promote.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="least test-accuracy gain required, as a fraction (default: any gain)",
    )
    promote.add_argument(
        "--force", action="store_true", help="promote even if not better (recorded as forced)"
    )
    _model_option(promote)
    promote.set_defaults(handler=_promote, backend="tensorflow")

    register = commands.add_parser(
        "register",
        help="test a finished study's best trial and register it as @challenger, once",
        description="Test and register the best trial of a study tuned with --no-register, on "
        "another backend or another machine that shares the stores (registering the same "
        "trial again changes nothing); or, with --bundle, a trial that `digitune gpu-check` "
        "wrote on a machine that does not share them.",
    )
    register_from = register.add_mutually_exclusive_group()
    register_from.add_argument(
        "--study",
        default=None,
        help="a study file, or the name of one (default: the default study)",
    )
    register_from.add_argument(
        "--bundle", default=None, help="a folder with best.json and best.weights.h5"
    )
    register.add_argument(
        "--storage",
        default=config.storage_url(),
        help="Optuna storage URL (default: DIGITUNE_STORAGE, else studies/<name>.db)",
    )
    register.add_argument("--json", action="store_true", help="print the result as JSON")
    _model_option(register, default=None)
    register.set_defaults(handler=_register, backend="tensorflow")

    rollback = commands.add_parser("rollback", help="champion back to the previous one")
    _model_option(rollback)
    rollback.set_defaults(handler=_rollback, backend="tensorflow")

    models = commands.add_parser("models", help="list registered versions and aliases")
    _model_option(models)
    models.set_defaults(handler=_models)

    collect = commands.add_parser(
        "gc", help="free disk: delete the artifacts of trials outside each study's best"
    )
    collect.add_argument(
        "--keep",
        type=int,
        default=5,
        help="best completed trials kept per study; the best and the Pareto front always (5)",
    )
    collect.add_argument("--dry-run", action="store_true", help="say what would go; delete none")
    collect.set_defaults(handler=_collect, backend="none")

    export = commands.add_parser(
        "export", help="TensorFlow Lite float16 and int8 files of a registered version"
    )
    export_choice = export.add_mutually_exclusive_group()
    export_choice.add_argument("--version", default=None, help="a version number")
    export_choice.add_argument("--alias", default=None, help="an alias (default: champion)")
    _model_option(export)
    export.set_defaults(handler=_export, backend="tensorflow")

    serve = commands.add_parser("serve", help="serve the champion: API and drawing page")
    address_arguments(serve, 8000, "the API and the page")
    _model_option(serve)
    serve.add_argument(
        "--model-uri",
        default=None,
        help="the model to serve (default: models:/<--model>@champion)",
    )
    serve.add_argument(
        "--poll-seconds", type=float, default=10.0, help="how often to check the alias (0: never)"
    )
    serve.set_defaults(handler=_serve, backend="tensorflow")

    bench_serve = commands.add_parser("bench-serve", help="measure a running service")
    bench_serve.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)"
    )
    bench_serve.add_argument(
        "--requests", type=int, default=500, help="single-image requests (default: %(default)s)"
    )
    bench_serve.add_argument(
        "--batch", type=int, default=64, help="images per batched request (default: %(default)s)"
    )
    bench_serve.add_argument(
        "--pressure",
        action="store_true",
        help="measure /health and memory under concurrent large uploads and slow clients",
    )
    bench_serve.add_argument(
        "--pid", type=int, default=None, help="the server's process id, to read its memory"
    )
    bench_serve.set_defaults(handler=_bench_serve, backend="none")

    server = commands.add_parser(
        "mlflow-server", help="an MLflow tracking server that workers on several machines share"
    )
    address_arguments(server, 5000, "the tracking server")
    server.add_argument(
        "--backend-store-uri",
        default=config.backend_store_uri(),
        help="SQL database of runs (default: MLFLOW_BACKEND_STORE_URI, else the project's "
        "SQLite store in mlruns/); prefer the variable when the URI holds a password",
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
    address_arguments(ui, 5000, "the MLflow UI")
    ui.set_defaults(handler=_ui, backend="none")


@contextlib.contextmanager
def stdout_to_stderr():
    """Standard output sent to stderr for the block, in this process (Python's and the file
    descriptor's) and in the processes it starts."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def address_arguments(parser: argparse.ArgumentParser, port: int, what: str) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help=f"the address {what} listens on (default: %(default)s, this machine only; "
        "0.0.0.0 for every network interface)",
    )
    parser.add_argument(
        "--port", type=int, default=port, help=f"the port {what} listens on (default: %(default)s)"
    )


def _model_option(parser: argparse.ArgumentParser, default=config.REGISTERED_MODEL_NAME) -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="the registered model, as a study's [registry] model_name (default: "
        + ("%(default)s)" if default else "the study's)"),
    )


def _promote(args: argparse.Namespace) -> int:
    from digitune import promotion

    decision = promotion.promote(margin=args.margin, force=args.force, model_name=args.model)
    print(promotion.table(decision).to_string())
    if decision.promoted:
        forced = " (FORCED)" if decision.forced else ""
        print(f"\npromoted version {decision.challenger} to @champion{forced}: {decision.reason}")
        return 0
    print(f"\nrefused: version {decision.challenger} stays @challenger; {decision.reason}")
    print("use --force to promote it anyway")
    return 3


def _register(args: argparse.Namespace) -> int:
    import json

    from digitune import registry, tracking

    tracking.configure()
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        result, words = _registered(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{words}\nregistered {result['model_name']} version {result['model_version']} "
            f"({registry.aliases_of(result['model_name'], result['model_version'])})"
        )
    return 0


def _registered(args: argparse.Namespace) -> tuple[dict, str]:
    from digitune import bundle, data, registry, study, tracking

    if args.bundle:
        result = bundle.register(args.bundle, args.model)
        words = (
            f"test accuracy {result['test_accuracy']:.4f} here, "
            f"{result['trained_test_accuracy']:.4f} where it trained ({result['trained_on']})"
        )
    else:
        definition, optuna_study = study.load_existing(
            args.study or config.DEFAULT_STUDY, args.storage
        )
        parent_run_id = optuna_study.user_attrs.get(tracking.PARENT_RUN_ATTR)
        if parent_run_id is None:
            raise ValueError(f"study '{definition.study.name}' has no MLflow parent run")
        best = registry.BestTrial.of(optuna_study)
        if args.model:
            definition = dataclasses.replace(
                definition, registry=dataclasses.replace(definition.registry, model_name=args.model)
            )
        test_accuracy, version = registry.register_best(
            best, definition, data.load(definition.data), parent_run_id
        )
        result = {
            "study": definition.study.name,
            "trial": best.number,
            "validation_accuracy": best.validation_accuracy,
            "test_accuracy": test_accuracy,
            "model_name": definition.model_name,
            "model_version": version,
        }
        words = (
            f"trial {best.number}: validation accuracy {best.validation_accuracy:.4f}, "
            f"test accuracy {test_accuracy:.4f}"
        )
    return result, words


def _rollback(args: argparse.Namespace) -> int:
    from digitune import promotion, tracking

    previous, current = promotion.rollback(tracking.configure(), args.model)
    print(f"@champion moved back from version {previous} to version {current}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from digitune import registry, tracking

    client = tracking.configure()
    # Says which models there are when this one is not.
    registry.version_by_alias(
        client, config.CHALLENGER_ALIAS, required=False, model_name=args.model
    )
    print(registry.versions_table(client, args.model).to_string(index=False))
    return 0


def _export(args: argparse.Namespace) -> int:
    from digitune import deployment

    table = deployment.export(args.version, args.alias, args.model)
    print(table.to_string(index=False))
    print("logged under tflite/ in the version's run; sizes as version tags")
    return 0


def _collect(args: argparse.Namespace) -> int:
    from digitune import garbage

    print(garbage.summary(garbage.collect(args.keep, args.dry_run)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from digitune import serve

    # A registry that is down is reported in seconds (on /health), not after MLflow's minutes
    # of retries; the poller tries again every --poll-seconds anyway.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    model_uri = args.model_uri or f"models:/{args.model}@{config.CHAMPION_ALIAS}"
    print(f"serving {model_uri} on http://{args.host}:{args.port} (docs at /docs)")
    serve.run(args.host, args.port, model_uri, args.poll_seconds)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from digitune.bench import serving

    if args.pressure:
        print(serving.pressure(args.url, args.pid).to_string(index=False))
        return 0
    print(serving.serve_latency(args.url, args.requests, args.batch).to_string(index=False))
    return 0


def _mlflow_server(args: argparse.Namespace) -> int:
    artifacts = config.mlruns_dir() / "artifacts"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        # The server stores and serves artifacts itself, so workers need no shared disk.
        "--artifacts-destination",
        str(artifacts),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    settings = {}
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
        f"{config.redact(args.backend_store_uri)}"
        + (", asking every client for a user and password" if args.auth else "")
        + f"; on each worker machine set MLFLOW_TRACKING_URI=http://<this host>:{args.port}"
        + (" and MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD" if args.auth else "")
    )
    return _call_with_store(command, args.backend_store_uri, settings)


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
