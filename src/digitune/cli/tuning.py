"""The tuning stage's commands: data, tune, report, ensemble and bench.

Each handler imports what it runs when it runs, so that `digitune --help` answers without
loading TensorFlow.
"""

from __future__ import annotations

import argparse
import sys

from digitune import config


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="fetch and verify MNIST (or a study's [data])")
    data.add_argument("--study", default=None, help="a study file whose [data] to fetch and check")
    data.set_defaults(handler=_data)

    tune = commands.add_parser("tune", help="run or resume a study")
    add_study_arguments(tune)
    tune.add_argument(
        "--trials", type=int, default=None, help="the study's total trials (overrides the file)"
    )
    tune.add_argument("--timeout-minutes", type=float, default=None, help="time limit of this run")
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
        help="then retrain the best configuration on all 60,000 training images and register "
        "it as the challenger",
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
    ensemble.set_defaults(handler=_ensemble)

    bench = commands.add_parser(
        "bench",
        help="training throughput vs plain fit, tuning race vs Keras Tuner, tracking overhead",
    )
    bench.add_argument(
        "--repeats", type=int, default=3, help="rounds of the throughput measurement"
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
        choices=("throughput", "race", "ablation"),
        default=None,
        help="run one part only (race: against Keras Tuner; ablation: the default study's levers)",
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
        default=str(config.default_study_file()),
        help="study file (default: %(default)s)",
    )
    parser.add_argument(
        "--storage",
        default=config.storage_url(),
        help="Optuna storage URL (default: DIGITUNE_STORAGE, else studies/<name>.db); prefer "
        "the variable when the URL holds a password",
    )


def _data(args: argparse.Namespace) -> int:
    from digitune import data, datasets, space

    if args.study:
        dataset = datasets.load(space.load(args.study).data)
        print(
            f"{dataset.source}: {dataset.name}, {len(dataset.train_labels):,} training and "
            f"{len(dataset.test_labels):,} test pictures of {dataset.image_shape}, classes "
            f"{', '.join(dataset.class_names)}; data hash {dataset.digest[:16]}"
        )
        return 0
    mnist = data.load()
    state = "the published MNIST" if mnist.canonical else "NOT the published MNIST (a subset?)"
    print(
        f"{mnist.source}: {len(mnist.train_labels):,} training and {len(mnist.test_labels):,} "
        f"test images, SHA-256 verified, {state}; data hash {mnist.digest[:16]}"
    )
    return 0


def _tune(args: argparse.Namespace) -> int:
    from digitune import study, trainer
    from digitune.engines import optuna as optuna_engine

    trainer.stop_cleanly_on_ctrl_c()
    if args.engine == "keras-tuner":
        return _tune_with_keras_tuner(args)

    outcome = optuna_engine.run(
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
        state = trial.state.name.lower()
        if trial.user_attrs.get(study.DEADLINE_ATTR):
            state += " but cut short by the deadline"
        states[state] = states.get(state, 0) + 1
    print(
        f"\nstudy '{outcome.study.study_name}' in {outcome.seconds / 60:.1f} min: "
        + ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        + f"\nbest trial {outcome.best_trial.number}: validation accuracy "
        f"{outcome.best_trial.values[0]:.4f}, test accuracy {outcome.test_accuracy:.4f}"
        f"\nregistered {outcome.model_name} version {outcome.model_version} "
        f"(alias @{config.CHALLENGER_ALIAS}); compare trials with `make ui`"
    )
    if outcome.model_name != config.REGISTERED_MODEL_NAME:
        print(
            f"its commands take --model {outcome.model_name} (MODEL={outcome.model_name} in make)"
        )
    costs = outcome.best_trial.user_attrs.get("costs")  # objectives.COSTS_ATTR
    if costs:
        print(
            f"its deployment costs: {costs['params']:,.0f} "
            f"parameters; see the front with `digitune pareto --study {args.study}`, pick "
            f"within a budget with `digitune select --study {args.study} --max-params N`"
        )
    if outcome.refit is not None:
        print(
            f"refit on all training images ({outcome.refit.epochs} epochs): test accuracy "
            f"{outcome.refit.test_accuracy:.4f} (the trial's own model: "
            f"{outcome.refit.trial_test_accuracy:.4f}); registered as version "
            f"{outcome.refit.version}, now @{config.CHALLENGER_ALIAS}"
        )
    if outcome.worker_deaths:
        print(
            "error: " + "; ".join(outcome.worker_deaths) + ". Its trials were failed and run "
            "again by the other workers, and the study finished; look into why it died",
            file=sys.stderr,
        )
        return 1
    return 0


def _tune_with_keras_tuner(args: argparse.Namespace) -> int:
    from digitune.engines import keras_tuner as keras_tuner_engine

    if args.workers not in (None, 1) or args.join or args.storage or args.refit:
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
        f"\nregistered {outcome.model_name} version {outcome.model_version} "
        f"(alias @{config.CHALLENGER_ALIAS}); compare engines with `make ui`"
    )
    return 0


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
    from digitune.bench import contenders, race, throughput

    if args.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    if args.contenders and args.only not in ("race", "ablation"):
        raise ValueError("--contenders names the racers of one part: add --only race or ablation")
    written = []
    if args.only in (None, "throughput"):
        table = throughput.training_throughput(args.repeats)
        print(table.to_string(index=False))
        written.append(bench.write_results("training_throughput", table))
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
