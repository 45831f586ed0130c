"""Understand a study: a summary in the terminal and figures in its parent MLflow run.

`digitune report --study studies/mnist-cnn.toml` prints trials by state, the best trial, the
top 10 trials and the parameter importances, and logs to the study's parent run the trials
table (CSV) and PNG figures: optimization history, parameter importances, parallel
coordinates, intermediate values (pruning curves), and the slice and contour plots of the two
most important parameters. `tune` calls the same code when a study ends.
"""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from digitune import artifacts, config, pareto, space, tracking  # noqa: E402

TOP_TRIALS = 10


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row a trial: number, state, value, epochs run, duration and params."""
    frame = study.trials_dataframe(
        attrs=("number", "state", "value", "duration", "params", "user_attrs")
    )
    if frame.empty:
        return frame
    # A study with metric names calls its value column value_<name> (values_<name> with
    # several objectives); the table says value, and the costs by their names.
    frame = frame.rename(columns=lambda c: c.removeprefix("values_").removeprefix("value_"))
    frame = frame.rename(columns={config.OBJECTIVE_METRIC: "value"})
    frame["seconds"] = frame.pop("duration").dt.total_seconds().round(1)
    frame = frame.rename(columns=lambda c: c.removeprefix("params_"))
    frame["epochs"] = frame.get("user_attrs_epochs", pd.Series(dtype="Int64")).astype("Int64")
    # Pruned trials record no epochs attribute; their reported steps say how far they got.
    for trial in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        frame.loc[frame["number"] == trial.number, "epochs"] = len(trial.intermediate_values)
    keep = [
        "number",
        "state",
        "value",
        *[c for c in config.COSTS if c in frame],
        "epochs",
        "seconds",
    ]
    names = {name for trial in study.trials for name in trial.params}
    return frame[keep + [c for c in frame.columns if c in names]]


def importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA, seeded so that the terminal, the figures and
    the choice of slice and contour parameters agree), or {} while too few trials completed."""
    if _completed(study) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(
            study,
            evaluator=_evaluator(),
            target=pareto.accuracy if len(study.directions) > 1 else None,
        )
    except (RuntimeError, ValueError):  # Too few distinct values to fit a forest on.
        return {}


def _evaluator() -> optuna.importance.FanovaImportanceEvaluator:
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def summary(study: optuna.Study, ranked: dict[str, float] | None = None) -> str:
    """The report a person reads in the terminal; `ranked` are the importances if known."""
    table = trials_table(study)
    if table.empty:
        return f"study '{study.study_name}' has no trials yet"
    states = table["state"].value_counts()
    lines = [
        f"study '{study.study_name}': {len(table)} trials ("
        + ", ".join(f"{count} {state.lower()}" for state, count in states.items())
        + ")"
    ]
    if _completed(study) and _has_best(study):
        best = pareto.best_trial(study)
        lines.append(
            f"best trial {best.number}: value {pareto.accuracy(best):.4f}, "
            + ", ".join(f"{k}={space.readable(v)}" for k, v in best.params.items())
        )
        top = table[table["state"] == "COMPLETE"].sort_values("value", ascending=False)
        lines += ["", f"top {TOP_TRIALS} trials:", top.head(TOP_TRIALS).to_string(index=False)]
    ranked = importances(study) if ranked is None else ranked
    if ranked:
        lines += ["", "parameter importances (fANOVA):"]
        lines += [f"  {name:20s} {value:6.3f}" for name, value in ranked.items()]
    return "\n".join(lines)


def figures(study: optuna.Study, ranked: dict[str, float]) -> dict[str, plt.Figure]:
    """The study's figures by file name; those that cannot be drawn yet are left out. In a
    multi-objective study they show validation accuracy (`digitune.objectives` draws the
    front)."""
    if not _completed(study):
        return {}
    ranked = list(ranked)
    # Optuna's plots take one objective: validation accuracy, when a study has several.
    target = (
        {"target": pareto.accuracy, "target_name": config.OBJECTIVE_METRIC}
        if len(study.directions) > 1
        else {}
    )
    plots = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study, **target),
        "parallel_coordinate.png": lambda: optuna_plots.plot_parallel_coordinate(study, **target),
    }
    if not target:  # multi-objective trials report no epochs
        plots["intermediate_values.png"] = lambda: optuna_plots.plot_intermediate_values(study)
    if ranked:
        plots["param_importances.png"] = lambda: optuna_plots.plot_param_importances(
            study, evaluator=_evaluator(), **target
        )
        plots["slice.png"] = lambda: optuna_plots.plot_slice(study, params=ranked[:2], **target)
    if len(ranked) >= 2:
        plots["contour.png"] = lambda: optuna_plots.plot_contour(study, params=ranked[:2], **target)
    drawn = {}
    verbosity = optuna.logging.get_verbosity()
    # Optuna warns, through its logger, of a parameter with one value so far ("unique value
    # length is less than 2") and draws it anyway; the figure shows what there is to see.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        _draw(study, plots, drawn)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return drawn


def _draw(study: optuna.Study, plots: dict, drawn: dict) -> None:
    with warnings.catch_warnings():
        # Optuna marks its matplotlib plots experimental; the warning says nothing to users.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # A parameter with one value so far draws a flat axis, and matplotlib says so.
        warnings.filterwarnings("ignore", message="Attempting to set identical low and high")
        for name, plot in plots.items():
            axes = plot()
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figure = first.figure
            figure.set_size_inches(max(figure.get_size_inches()[0], 8), 5.5)
            figure.suptitle(
                f"study {study.study_name}: {name.removesuffix('.png').replace('_', ' ')}"
            )
            if name == "intermediate_values.png":
                # Trials report once per epoch; say so rather than Optuna's generic "Step".
                first.set_xlabel("epoch")
                first.set_ylabel("validation accuracy")
                curves = [t.intermediate_values for t in study.trials if t.intermediate_values]
                if curves:
                    first.set_ylim(*_where_trials_ended(curves))
            drawn[name] = figure


def _where_trials_ended(curves: list[dict[int, float]]) -> tuple[float, float]:
    """The pruning curves' y-range: from the lowest value a trial ended at to the highest
    value reached, with a margin. A first epoch (of batch normalisation, say) can sit far
    below every final value and would flatten the curves that pruning compares."""
    low = min(values[max(values)] for values in curves)
    high = max(max(values.values()) for values in curves)
    margin = max((high - low) * 0.1, 1e-3)
    return low - margin, high + margin


def log_to_run(
    study: optuna.Study,
    run_id: str,
    ranked: dict[str, float] | None = None,
    settings: config.ObjectiveSettings | None = None,
) -> None:
    """Log the trials table and the figures to a run (the study's parent) under report/;
    with a study's [objectives] `settings`, its Pareto front too (figure and table)."""
    files: dict = {}
    table = trials_table(study)
    if not table.empty:
        files["trials.csv"] = table.to_csv(index=False)
    measured = pareto.table(study) if settings and settings.measured else None
    if measured is not None and not measured.empty:
        front = pareto.front(measured, pareto.front_costs(settings))
        files["pareto_front.csv"] = front.to_csv(index=False)
        title = f"study {study.study_name}: Pareto front"
        files["pareto_front.png"] = pareto.plot(measured, settings, title)
    ranked = importances(study) if ranked is None else ranked
    files.update(figures(study, ranked))
    try:
        artifacts.log_report(run_id, files)
    finally:
        for content in files.values():
            if isinstance(content, plt.Figure):
                plt.close(content)


def report(study: optuna.Study, settings: config.ObjectiveSettings | None = None) -> str:
    """Log the report to the study's parent run and return the terminal summary."""
    tracking.configure()
    run_id = study.user_attrs.get(tracking.PARENT_RUN_ATTR)
    if run_id is None:
        raise ValueError(
            f"study '{study.study_name}' has no MLflow parent run; was it run by tune?"
        )
    ranked = importances(study)  # A forest fit: once, for the figures and the summary.
    log_to_run(study, run_id, ranked, settings)
    return summary(study, ranked)


def _has_best(study: optuna.Study) -> bool:
    try:
        pareto.best_trial(study)
    except ValueError:  # every completed trial is over a limit
        return False
    return True


def _completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
