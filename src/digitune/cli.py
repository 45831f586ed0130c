"""The `digitune` command; every make target is a thin call of one of its subcommands.

    digitune data                              fetch and verify MNIST
    digitune tune --study studies/quick.toml   run (or resume) a study
    digitune tune --workers 2                  ... in two worker processes
    digitune tune --storage URL --join         add this machine's workers to a study
    digitune tune --engine keras-tuner         the same study with Keras Tuner's Hyperband
    digitune mlflow-server                     a tracking server for several machines
    digitune report --study studies/quick.toml  summarise a study, log its figures
    digitune promote [--margin M] [--force]    challenger -> champion, on evidence
    digitune ensemble --top 5                  register the average of the 5 best trials
    digitune export [--version N]              TFLite float16/int8 files of a version
    digitune rollback                          champion back to the previous one
    digitune models                            list the registered versions
    digitune serve [--port 8000]               the champion behind an API and a page
    digitune bench                             training throughput vs the tutorial's fit
    digitune bench-serve                       latency of a running service
    digitune ui                                the MLflow UI on the project's store

`digitune <command> --help` lists each command's options.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from digitune import config


def main(argv: list[str] | None = None) -> int:
    # Quieten TensorFlow's start-up chatter (CUDA probing on CPU machines) before it loads.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # One line per trial should show up as it happens, also when piped to a file or `tee`.
    sys.stdout.reconfigure(line_buffering=True)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: every finished trial is saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        # The stores' own errors (an unreachable database, a refused request) are the user's
        # to act on as well; anything else is a bug and keeps its traceback.
        if not type(error).__module__.startswith(("mlflow", "optuna", "sqlalchemy")):
            raise
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="command")

    data_parser = commands.add_parser("data", help="fetch and verify MNIST")
    data_parser.set_defaults(handler=_data)

    tune_parser = commands.add_parser("tune", help="run or resume a study")
    tune_parser.add_argument(
        "--study",
        default=str(config.default_study_file()),
        help="study file (default: %(default)s)",
    )
    tune_parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: studies/<name>.db)"
    )
    tune_parser.add_argument(
        "--trials", type=int, default=None, help="the study's total trials (overrides the file)"
    )
    tune_parser.add_argument(
        "--timeout-minutes", type=float, default=None, help="time limit of this run"
    )
    tune_parser.add_argument(
        "--workers", type=int, default=1, help="worker processes sharing the study (default: 1)"
    )
    tune_parser.add_argument(
        "--join",
        action="store_true",
        help="only run trials of a study started elsewhere (another machine's `make tune`)",
    )
    tune_parser.add_argument(
        "--refit",
        action="store_true",
        help="then retrain the best configuration on all 60,000 training images and register "
        "it as the challenger",
    )
    tune_parser.add_argument(
        "--engine",
        choices=("optuna", "keras-tuner"),
        default="optuna",
        help="which tuner runs the study (default: %(default)s)",
    )
    tune_parser.add_argument(
        "--algorithm",
        choices=("hyperband", "bayesian"),
        default="hyperband",
        help="Keras Tuner's algorithm, with --engine keras-tuner (default: %(default)s)",
    )
    tune_parser.set_defaults(handler=_tune)

    report_parser = commands.add_parser("report", help="summarise a study and log its figures")
    _add_study_arguments(report_parser)
    report_parser.set_defaults(handler=_report)

    promote_parser = commands.add_parser(
        "promote", help="make the challenger champion if it is better on the test set"
    )
    promote_parser.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="least test-accuracy gain required, as a fraction (default: any gain)",
    )
    promote_parser.add_argument(
        "--force", action="store_true", help="promote even if not better (recorded as forced)"
    )
    promote_parser.set_defaults(handler=_promote)

    ensemble_parser = commands.add_parser(
        "ensemble", help="register the average of a study's best trials' models"
    )
    _add_study_arguments(ensemble_parser)
    ensemble_parser.add_argument("--top", type=int, default=5, help="members (default: 5)")
    ensemble_parser.add_argument(
        "--greedy",
        action="store_true",
        help="greedy forward selection on validation accuracy instead of the top K",
    )
    ensemble_parser.set_defaults(handler=_ensemble)

    export_parser = commands.add_parser(
        "export", help="TensorFlow Lite float16 and int8 files of a registered version"
    )
    export_choice = export_parser.add_mutually_exclusive_group()
    export_choice.add_argument("--version", default=None, help="a version number")
    export_choice.add_argument("--alias", default=None, help="an alias (default: champion)")
    export_parser.set_defaults(handler=_export)

    rollback_parser = commands.add_parser("rollback", help="champion back to the previous one")
    rollback_parser.set_defaults(handler=_rollback)

    models_parser = commands.add_parser("models", help="list registered versions and aliases")
    models_parser.set_defaults(handler=_models)

    serve_parser = commands.add_parser("serve", help="serve the champion: API and drawing page")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument(
        "--model-uri",
        default=f"models:/{config.REGISTERED_MODEL_NAME}@{config.CHAMPION_ALIAS}",
        help="the model to serve (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--poll-seconds", type=float, default=10.0, help="how often to check the alias (0: never)"
    )
    serve_parser.set_defaults(handler=_serve)

    throughput_parser = commands.add_parser(
        "bench",
        help="training throughput vs plain fit, tuning race vs Keras Tuner, tracking overhead",
    )
    throughput_parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of the throughput measurement"
    )
    throughput_parser.add_argument(
        "--budget-minutes",
        type=float,
        default=10.0,
        help="wall-clock budget of each tuning-race contender (default: %(default)s)",
    )
    throughput_parser.add_argument(
        "--only", choices=("throughput", "race"), default=None, help="run one part only"
    )
    throughput_parser.set_defaults(handler=_bench)

    bench_parser = commands.add_parser("bench-serve", help="measure a running service")
    bench_parser.add_argument("--url", default="http://127.0.0.1:8000")
    bench_parser.add_argument("--requests", type=int, default=500)
    bench_parser.add_argument("--batch", type=int, default=64)
    bench_parser.set_defaults(handler=_bench_serve)

    server_parser = commands.add_parser(
        "mlflow-server", help="an MLflow tracking server that workers on several machines share"
    )
    server_parser.add_argument("--host", default="127.0.0.1")
    server_parser.add_argument("--port", type=int, default=5000)
    server_parser.add_argument(
        "--backend-store-uri",
        default=None,
        help="SQL database of runs (default: the project's SQLite store in mlruns/)",
    )
    server_parser.set_defaults(handler=_mlflow_server)

    ui_parser = commands.add_parser("ui", help="start the MLflow UI on the project's store")
    ui_parser.add_argument("--host", default="127.0.0.1")
    ui_parser.add_argument("--port", type=int, default=5000)
    ui_parser.set_defaults(handler=_ui)
    return parser


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study",
        default=str(config.default_study_file()),
        help="study file (default: %(default)s)",
    )
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: studies/<name>.db)"
    )


def _data(args: argparse.Namespace) -> int:
    from digitune import data

    mnist = data.load()
    state = "the published MNIST" if mnist.canonical else "NOT the published MNIST (a subset?)"
    print(
        f"{mnist.source}: {len(mnist.train_labels):,} training and {len(mnist.test_labels):,} "
        f"test images, SHA-256 verified, {state}; data hash {mnist.digest[:16]}"
    )
    return 0


def _tune(args: argparse.Namespace) -> int:
    from digitune import objective, tune

    objective.stop_cleanly_on_ctrl_c()
    if args.engine == "keras-tuner":
        return _tune_with_keras_tuner(args)

    outcome = tune.run(
        args.study,
        args.storage,
        args.trials,
        args.timeout_minutes,
        args.workers,
        args.join,
        refit=args.refit,
    )
    if outcome is None:
        print("this machine's workers are done; the study's own `make tune` registers the best")
        return 0
    states = {}
    for trial in outcome.study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    print(
        f"\nstudy '{outcome.study.study_name}' in {outcome.seconds / 60:.1f} min: "
        + ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
        + f"\nbest trial {outcome.best_trial.number}: validation accuracy "
        f"{outcome.best_trial.value:.4f}, test accuracy {outcome.test_accuracy:.4f}"
        f"\nregistered {config.REGISTERED_MODEL_NAME} version {outcome.model_version} "
        f"(alias @{config.CHALLENGER_ALIAS}); compare trials with `make ui`"
    )
    if outcome.refit is not None:
        print(
            f"refit on all training images ({outcome.refit.epochs} epochs): test accuracy "
            f"{outcome.refit.test_accuracy:.4f} (the trial's own model: "
            f"{outcome.refit.trial_test_accuracy:.4f}); registered as version "
            f"{outcome.refit.version}, now @{config.CHALLENGER_ALIAS}"
        )
    return 0


def _tune_with_keras_tuner(args: argparse.Namespace) -> int:
    from digitune import keras_tuner_engine

    if args.workers != 1 or args.join or args.storage or args.refit:
        raise ValueError(
            "--workers, --join, --storage and --refit are Optuna's; Keras Tuner runs one worker "
            "and keeps its state in studies/<study>-keras-tuner-<algorithm>/"
        )
    outcome = keras_tuner_engine.run(args.study, args.algorithm, args.trials, args.timeout_minutes)
    print(
        f"\nstudy '{outcome.study_name}' in {outcome.seconds / 60:.1f} min: "
        f"{outcome.trials} trials"
        f"\nbest trial {outcome.best.number}: validation accuracy "
        f"{outcome.best.validation_accuracy:.4f}, test accuracy {outcome.test_accuracy:.4f}"
        f"\nregistered {config.REGISTERED_MODEL_NAME} version {outcome.model_version} "
        f"(alias @{config.CHALLENGER_ALIAS}); compare engines with `make ui`"
    )
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from digitune import ensemble

    outcome = ensemble.run(args.study, args.storage, args.top, args.greedy)
    print(
        f"validation accuracy: ensemble {outcome.validation_accuracy:.4f}, best single "
        f"{outcome.best_member_validation_accuracy:.4f}\n"
        f"test accuracy:       ensemble {outcome.test_accuracy:.4f}, best single "
        f"{outcome.best_member_test_accuracy:.4f}\n"
        f"registered {config.REGISTERED_MODEL_NAME} version {outcome.model_version} "
        f"(alias @{config.CHALLENGER_ALIAS}); `make promote` compares it with the champion"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from digitune import export

    table = export.run(args.version, args.alias)
    print(table.to_string(index=False))
    print("logged under tflite/ in the version's run; sizes as version tags")
    return 0


def _report(args: argparse.Namespace) -> int:
    from digitune import report, tune

    _, study = tune.load_existing_study(args.study, args.storage)
    print(report.report(study))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from digitune import promote

    decision = promote.promote(margin=args.margin, force=args.force)
    print(promote.table(decision).to_string())
    if decision.promoted:
        forced = " (FORCED)" if decision.forced else ""
        print(f"\npromoted version {decision.challenger} to @champion{forced}: {decision.reason}")
        return 0
    print(f"\nrefused: version {decision.challenger} stays @challenger; {decision.reason}")
    print("use --force to promote it anyway")
    return 3


def _rollback(args: argparse.Namespace) -> int:
    from digitune import registry

    previous, current = registry.rollback(registry.client_for_registry())
    print(f"@champion moved back from version {previous} to version {current}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from digitune import registry

    client = registry.client_for_registry()
    registry.version_by_alias(client, config.CHALLENGER_ALIAS, required=False)  # model exists?
    print(registry.versions_table(client).to_string(index=False))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from digitune import serve

    print(f"serving {args.model_uri} on http://{args.host}:{args.port} (docs at /docs)")
    serve.run(args.host, args.port, args.model_uri, args.poll_seconds)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from digitune import bench

    if args.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    written = []
    if args.only in (None, "throughput"):
        table = bench.training_throughput(args.repeats)
        print(table.to_string(index=False))
        written.append(bench.write_results("training_throughput", table))
    if args.only in (None, "race"):
        race, overhead, curves = bench.tuning_race(args.budget_minutes)
        written.append(bench.write_results("tuning_race", race, bench.plot_race(curves)))
        written.append(bench.write_results("tracking_overhead", overhead))
        print(f"\n{race.to_string(index=False)}\n\n{overhead.to_string(index=False)}")
        print(bench.race_summary(race))
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from digitune import bench

    print(bench.serve_latency(args.url, args.requests, args.batch).to_string(index=False))
    return 0


def _mlflow_server(args: argparse.Namespace) -> int:
    artifacts = config.mlruns_dir() / "artifacts"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", args.backend_store_uri or config.local_tracking_uri(),
        # The server stores and serves artifacts itself, so workers need no shared disk.
        "--artifacts-destination", str(artifacts),
        "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    print(
        f"MLflow tracking server on http://{args.host}:{args.port}; on each worker machine set "
        f"MLFLOW_TRACKING_URI=http://<this host>:{args.port}"
    )
    return subprocess.call(command)


def _ui(args: argparse.Namespace) -> int:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        config.tracking_uri(),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C stops it)")
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
