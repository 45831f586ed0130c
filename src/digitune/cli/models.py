"""The registry and serving stage's commands: promote, register, rollback, models, gc,
export, serve and bench-serve.

Each handler imports what it runs when it runs, so that `digitune --help` answers without
loading TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys

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
