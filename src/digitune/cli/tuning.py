"""The tuning stage's commands: init, data, tune, report, ensemble and bench.

Each handler imports what it runs when it runs, so that `digitune --help` answers without
loading TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from digitune import config
from digitune.cli import models

TUNE_EXAMPLES = """examples:
  digitune tune                                 the default study (studies/mnist-cnn.toml)
  digitune tune --study quick                   a shipped study by name: a two-minute smoke run
  digitune tune --study studies/full.toml --refit
  digitune tune --workers 2 --timeout-minutes 30
  digitune tune --storage postgresql://... --join   add this machine's workers to a study
  digitune tune --engine keras-tuner --algorithm bayesian
  digitune tune --no-register --json            tune only; the summary as JSON on stdout
"""


def add_commands(commands) -> None:
    init = commands.add_parser(
        "init",
        help="copy the shipped study files into ./studies to edit them",
        description="Copy the study files that ship with digitune into the project's "
        "studies/ folder (DIGITUNE_HOME, else the working directory); existing files are kept.",
    )
    init.set_defaults(handler=_init, backend="none")

    data = commands.add_parser("data", help="fetch and verify MNIST (or a study's [data])")
    data.add_argument("--study", default=None, help="a study whose [data] to fetch and check")
    data.set_defaults(handler=_data)

    tune = commands.add_parser(
        "tune",
        help="run or resume a study, then test and register its best model",
        description="Run (or resume) a study: trials until its budget is spent, each a child "
        "run in MLflow; then the best trial's model is tested once on the test set and "
        "registered as @challenger.",
        epilog=TUNE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_arguments(tune)
    tune.add_argument(
        "--trials", type=int, default=None, help="the study's total trials (overrides the file)"
    )
    tune.add_argument(
        "--timeout-minutes", type=float, default=None, help="time limit of this run, in minutes"
    )
    tune.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes sharing the study (default: the study file's `workers`, or 1)",
    )
    tune.add_argument(
        "--join",
        action="store_true",
        help="only run trials of a study started elsewhere (another machine's `make tune`)",
    )
    tune.add_argument(
        "--refit",
        action="store_true",
        help="then retrain the best configuration on all training images and register it as "
        "the challenger",
    )
    tune.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="test the best model but register nothing (a smoke run)",
    )
    tune.add_argument(
        "--json",
        action="store_true",
        help="print the end-of-study summary as one JSON object on stdout (trial lines go to "
        "stderr)",
    )
    tune.add_argument(
        "--engine",
        choices=("optuna", "keras-tuner"),
        default="optuna",
        help="which tuner runs the study (default: %(default)s)",
    )
    tune.add_argument(
        "--algorithm",
        choices=("hyperband", "bayesian"),
        default="hyperband",
        help="Keras Tuner's algorithm, with --engine keras-tuner (default: %(default)s)",
    )
    tune.set_defaults(handler=_tune)

    report = commands.add_parser("report", help="summarise a study and log its figures")
    add_study_arguments(report)
    report.set_defaults(handler=_report)

    ensemble = commands.add_parser(
        "ensemble", help="register the average of a study's best trials' models"
    )
    add_study_arguments(ensemble)
    ensemble.add_argument("--top", type=int, default=5, help="members (default: 5)")
    ensemble.add_argument(
        "--greedy",
        action="store_true",
        help="greedy forward selection on validation accuracy instead of the top K",
    )
    ensemble.add_argument(
        "--model",
        default=None,
        help="the registered model to add it to (default: the study's [registry] model_name)",
    )
    ensemble.set_defaults(handler=_ensemble, backend="tensorflow")

    bench = commands.add_parser(
        "bench",
        help="training throughput vs plain fit, tuning race vs Keras Tuner, tracking overhead",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of the throughput and own-pictures measurements",
    )
    bench.add_argument(
        "--budget-minutes",
        type=float,
        default=10.0,
        help="wall-clock budget of each tuning-race contender (default: %(default)s)",
    )
    bench.add_argument(
        "--seeds", type=int, default=3, help="seeds of each race contender (default: 3)"
    )
    bench.add_argument(
        "--only",
        choices=("throughput", "backends", "race", "ablation", "workers", "own-pictures"),
        default=None,
        help="run one part only (race: against Keras Tuner; ablation: the default study's "
        "levers; backends: the trainer on TensorFlow and on JAX, side by side; workers: the "
        "quick study's trials per minute with one worker and two; own-pictures: a study "
        "naming only its data against a careful hand-written network, on three datasets)",
    )
    bench.add_argument(
        "--own-minutes",
        type=float,
        default=3.0,
        help="own-pictures: the time budget of each dataset's study and baseline "
        "(default: %(default)s)",
    )
    bench.add_argument(
        "--contenders",
        type=lambda text: text.split(","),
        default=None,
        help="race or ablate only these, by name in lower case with hyphens (comma-separated)",
    )
    bench.set_defaults(handler=_bench)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--study",
        default=config.DEFAULT_STUDY,
        help="a study file, or the name of one in studies/ or shipped with digitune "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--storage",
        default=config.storage_url(),
        help="Optuna storage URL (default: DIGITUNE_STORAGE, else studies/<name>.db); prefer "
        "the variable when the URL holds a password",
    )


def _init(args: argparse.Namespace) -> int:
    copied, kept = config.copy_shipped_studies()
    folder = config.studies_dir()
    for path in copied:
        print(f"wrote {path}")
    if kept:
        print(f"kept {len(kept)} study file(s) already in {folder}: {', '.join(kept)}")
    print(f"edit them, then: digitune tune --study {folder / 'quick.toml'}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from digitune import data, study_file
    from digitune.data import mnist

    if args.study:
        dataset = data.load(study_file.load(args.study).data)
        print(
            f"{dataset.source}: {dataset.name}, {len(dataset.train_labels):,} training and "
            f"{len(dataset.test_labels):,} test pictures of {dataset.image_shape}, classes "
            f"{', '.join(dataset.class_names)}; data hash {dataset.digest[:16]}"
        )
        return 0
    found = mnist.load()
    state = "the published MNIST" if found.canonical else "NOT the published MNIST (a subset?)"
    print(
        f"{found.source}: {len(found.train_labels):,} training and {len(found.test_labels):,} "
        f"test images, SHA-256 verified, {state}; data hash {found.digest[:16]}"
    )
    return 0


def _tune(args: argparse.Namespace) -> int:
    from digitune import engines, trainer

    trainer.stop_cleanly_on_ctrl_c()
    budget = {
        "n_trials": args.trials,
        "timeout_minutes": args.timeout_minutes,
        "register": args.register,
    }
    if args.engine == "keras-tuner" and (
        args.workers not in (None, 1) or args.join or args.storage or args.refit
    ):
        raise ValueError(
            "--workers, --join, --storage and --refit are Optuna's; Keras Tuner runs one "
            "worker and keeps its state in studies/<study>-keras-tuner-<algorithm>/"
        )
    # With --json, stdout holds the summary alone: what the study prints on the way (its
    # workers' lines too) goes to stderr.
    with models.stdout_to_stderr() if args.json else contextlib.nullcontext():
        if args.engine == "keras-tuner":
            outcome = engines.module("keras-tuner").run(args.study, args.algorithm, **budget)
        else:
            outcome = engines.module("optuna").run(
                args.study,
                args.storage,
                workers=args.workers,
                join=args.join,
                refit_best=args.refit,
                # A bar that redraws itself is for a terminal; in a pipe or a log file it
                # would leave its every redraw between the trial lines.
                progress_bar=not args.json and sys.stderr.isatty(),
                **budget,
            )
    if outcome is None:
        print(
            "this worker is done; the study's last worker to finish tests and registers its "
            f"best (or, once they are done: digitune register --study {args.study})"
        )
        return 0
    if args.json:
        print(json.dumps(summary(outcome), indent=2))
    else:
        print(_summary_text(outcome, args.study))
    if outcome.worker_deaths:
        print(
            "error: " + "; ".join(outcome.worker_deaths) + ". Its trials were failed and run "
            "again by the other workers, and the study finished; look into why it died",
            file=sys.stderr,
        )
        return 1
    return 0


def summary(outcome) -> dict:
    """The end of a study as data: what `tune --json` prints."""
    best = outcome.best
    refit = outcome.refit
    return {
        "study": outcome.study_name,
        "engine": outcome.engine,
        "minutes": round(outcome.seconds / 60, 2),
        "trials": outcome.trials,
        "states": outcome.states,
        "best_trial": best.number,
        "validation_accuracy": round(best.validation_accuracy, 6),
        "test_accuracy": round(outcome.test_accuracy, 6),
        "params": best.params,
        "costs": best.costs,
        "model_name": outcome.model_name,
        "model_version": outcome.model_version,
        "alias": config.CHALLENGER_ALIAS if outcome.model_version else None,
        "parent_run_id": outcome.parent_run_id,
        "refit": None
        if refit is None
        else {
            "version": refit.version,
            "epochs": refit.epochs,
            "test_accuracy": round(refit.test_accuracy, 6),
        },
        "worker_deaths": list(outcome.worker_deaths),
    }


def _summary_text(outcome, study: str) -> str:
    from digitune import registry, tracking

    best = outcome.best
    lines = [
        f"\nstudy '{outcome.study_name}' in {outcome.seconds / 60:.1f} min: "
        + ", ".join(f"{count} {state}" for state, count in outcome.states.items()),
        f"best trial {best.number}: validation accuracy {best.validation_accuracy:.4f}, "
        f"test accuracy {outcome.test_accuracy:.4f}",
    ]
    if outcome.model_version is None:
        lines.append("registered nothing (--no-register)")
    else:
        lines.append(
            f"registered {outcome.model_name} version {outcome.model_version} "
            f"({registry.aliases_of(outcome.model_name, outcome.model_version)})"
        )
    server = config.tracking_uri().startswith(("http://", "https://"))
    where = "in the tracking server's MLflow UI" if server else "with `make ui`"
    lines.append(f"compare trials {where}: {tracking.runs_page(outcome.parent_run_id)}")
    if outcome.model_version and outcome.model_name != config.REGISTERED_MODEL_NAME:
        lines.append(
            f"its commands take --model {outcome.model_name} (MODEL={outcome.model_name} in make)"
        )
    if best.costs:
        lines.append(
            f"its deployment costs: {best.costs['params']:,.0f} parameters; see the front with "
            f"`digitune pareto --study {study}`, pick within a budget with "
            f"`digitune select --study {study} --max-params N`"
        )
    refit = outcome.refit
    if refit is not None:
        lines.append(
            f"refit on all training images ({refit.epochs} epochs): test accuracy "
            f"{refit.test_accuracy:.4f} (the trial's own model: "
            f"{refit.trial_test_accuracy:.4f}); registered as version {refit.version}, now "
            f"@{config.CHALLENGER_ALIAS}"
        )
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> int:
    from digitune import report, study

    definition, optuna_study = study.load_existing(args.study, args.storage)
    print(report.report(optuna_study, definition.objectives))
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from digitune import ensemble

    outcome = ensemble.run(args.study, args.storage, args.top, args.greedy, args.model)
    print(
        f"validation accuracy: ensemble {outcome.validation_accuracy:.4f}, best single "
        f"{outcome.best_member_validation_accuracy:.4f}\n"
        f"test accuracy:       ensemble {outcome.test_accuracy:.4f}, best single "
        f"{outcome.best_member_test_accuracy:.4f}\n"
        f"registered {outcome.model_name} version {outcome.model_version} "
        f"(alias @{config.CHALLENGER_ALIAS}); `make promote` compares it with the champion"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from digitune import bench
    from digitune.bench import contenders, own_pictures, race, throughput, workers

    if args.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.contenders and args.only not in ("race", "ablation"):
        raise ValueError("--contenders names the racers of one part: add --only race or ablation")
    written = []
    if args.only in (None, "throughput"):
        table = throughput.training_throughput(args.repeats)
        print(table.to_string(index=False))
        written.append(bench.write_results("training_throughput", table))
    if args.only in (None, "workers"):
        runs, table = workers.workers_throughput(args.repeats)
        print(f"{runs.to_string(index=False)}\n\n{table.to_string(index=False)}")
        written.append(bench.write_results("workers_runs", runs))
        written.append(bench.write_results("workers", table))
    if args.only in (None, "own-pictures"):
        if args.own_minutes <= 0:
            raise ValueError(f"--own-minutes must be positive, got {args.own_minutes}")
        runs, table = own_pictures.own_pictures(args.own_minutes, args.repeats)
        print(f"{runs.to_string(index=False)}\n\n{table.to_string(index=False)}")
        written.append(bench.write_results("own_pictures_runs", runs))
        written.append(bench.write_results("own_pictures", table))
    if args.only == "backends":
        table = throughput.backends_throughput(args.repeats)
        print(table.to_string(index=False))
        written.append(bench.write_results("backends_throughput", table))
    parts = {  # part: contenders, the one the others are compared with, the plot's title
        "race": (contenders.CONTENDERS, contenders.HYPERBAND, "Tuning race on the default study"),
        "ablation": (
            contenders.ABLATION,
            contenders.DEFAULT_STUDY,
            "Ablation of the default study",
        ),
    }
    for part, (racers, reference, title) in parts.items():
        if args.only not in (None, part):
            continue
        racers = contenders.chosen(racers, args.contenders)
        reference = reference if reference in racers else racers[0]
        results = race.tuning_race(args.budget_minutes, args.seeds, contenders=racers, title=title)
        figure = race.plot_race(results.curves, title)
        name = "tuning_race" if part == "race" else "ablation"
        written.append(bench.write_results(name, results.summary, figure))
        written.append(bench.write_results(f"{name}_runs", results.runs))
        written.append(bench.write_results(f"{name}_tracking_overhead", results.overhead))
        print(f"\n{results.runs.to_string(index=False)}\n")
        print(
            f"{results.summary.to_string(index=False)}\n\n{results.overhead.to_string(index=False)}"
        )
        print(race.compare(results.summary, reference.name))
    print("\nwritten: " + ", ".join(str(path) for path in written))
    return 0
