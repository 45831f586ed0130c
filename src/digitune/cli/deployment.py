"""The commands of tuning for deployment: the Pareto front, selecting a model within a
budget, and a live dashboard of a study.

    digitune pareto --study studies/edge.toml
    digitune select --study studies/edge.toml --max-params 10000 [--max-kb K] [--max-latency-ms X]
    digitune dashboard --study studies/edge.toml [--port 8080]
"""

from __future__ import annotations

import argparse

from digitune.cli import models, tuning


def add_commands(commands) -> None:
    pareto = commands.add_parser(
        "pareto", help="print a study's Pareto front: accuracy, parameters, int8 size, latency"
    )
    tuning.add_study_arguments(pareto)
    pareto.set_defaults(handler=_pareto)

    select = commands.add_parser(
        "select",
        help="register the most accurate Pareto model within limits as @challenger",
    )
    tuning.add_study_arguments(select)
    for cost, flag, words in (
        ("params", "--max-params", "parameters"),
        ("int8_kb", "--max-kb", "KB of its int8 TFLite file"),
        ("latency_ms", "--max-latency-ms", "ms for one image, single-threaded"),
    ):
        select.add_argument(
            flag, dest=cost, type=float, default=None, help=f"at most this many {words}"
        )
    select.set_defaults(handler=_select, backend="tensorflow")

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard on a study's storage, live")
    tuning.add_study_arguments(dashboard)
    models.address_arguments(dashboard, 8080, "the dashboard")
    dashboard.set_defaults(handler=_dashboard)


def _pareto(args: argparse.Namespace) -> int:
    from digitune import pareto, study

    definition, optuna_study = study.load_existing(args.study, args.storage)
    trials = pareto.table(optuna_study)
    if trials.empty:
        raise ValueError(
            f"study '{optuna_study.study_name}' has no completed trial that measured its costs; "
            f"give {args.study} an [objectives] table (see studies/edge.toml) and tune it"
        )
    costs = pareto.front_costs(definition.objectives)
    front = pareto.front(trials, costs)
    limits = definition.objectives.limits
    print(
        f"study '{optuna_study.study_name}': {len(front)} of {len(trials)} measured trials on the "
        f"front of validation accuracy against {', '.join(costs)}"
        + (f"; limits {', '.join(f'{k} <= {v:,.6g}' for k, v in limits.items())}" if limits else "")
        + "\n(latency: median ± half the interquartile range of one image through the served "
        "SavedModel)\n"
    )
    print(pareto.as_text(front))
    return 0


def _select(args: argparse.Namespace) -> int:
    import contextlib

    import tensorflow as tf

    # Latency is measured single-threaded, as in the trials; this must come before TensorFlow
    # runs anything (in a process that already has, as a test's, the threads stay).
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from digitune import deployment

    limits = {
        cost: getattr(args, cost)
        for cost in ("params", "int8_kb", "latency_ms")
        if getattr(args, cost) is not None
    }
    chosen = deployment.select(args.study, args.storage, limits)
    costs = chosen.costs
    print(
        f"selected trial {chosen.trial}: validation accuracy {chosen.validation_accuracy:.4f}, "
        f"test accuracy {chosen.test_accuracy:.4f}, {costs['params']:,.0f} parameters, "
        f"int8 TFLite {costs['int8_kb']:.1f} KB, latency {costs['latency_ms']:.3f} ms "
        f"(served by the registered model: {chosen.served_latency_ms:.3f} ms)\n"
        f"registered {chosen.model_name} version {chosen.version} (alias @challenger); "
        f"`make promote MODEL={chosen.model_name}` makes it the champion if it is better"
    )
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from wsgiref import simple_server

    import optuna_dashboard

    from digitune import config, study

    definition, _ = study.load_existing(args.study, args.storage)  # it exists, or say how
    url = args.storage or config.default_storage(definition.study.name)

    class QuietHandler(simple_server.WSGIRequestHandler):
        def log_message(self, *args) -> None:  # not a line per request
            pass

    server = simple_server.make_server(
        args.host, args.port, optuna_dashboard.wsgi(url), handler_class=QuietHandler
    )
    print(
        f"optuna-dashboard for study '{definition.study.name}' at "
        f"http://{args.host}:{server.server_port}/dashboard (Ctrl-C to stop)"
    )
    with server:
        server.serve_forever()
    return 0
