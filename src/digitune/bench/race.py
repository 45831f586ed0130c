"""The tuning race (`digitune bench --only race --budget-minutes 10 --seeds 3`): each
contender tunes the default study for the same wall-clock budget, over several seeds.

Contenders (`contenders.py`): the default study as its file configures it, Optuna's random
sampler without pruning, and Keras Tuner Hyperband (in whole passes); or the ablation's cells
(`--only ablation`). Each seed runs all of them, one after the other, on fresh stores, tracked
in MLflow's `tuning-race` experiment (nothing is registered). All is read back from MLflow: a
row per contender and seed, medians and ranges over seeds, tracking overhead, best-so-far curves.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from digitune import config, study_file, tracking
from digitune.bench.contenders import CONTENDERS, Contender
from digitune.engines import keras_tuner_search, optuna_search

log = logging.getLogger(__name__)

RACE_EXPERIMENT = "tuning-race"
RACE_TARGETS = (0.99, 0.993)


@dataclasses.dataclass(frozen=True)
class Race:
    """What a race measured, all read back from MLflow."""

    runs: pd.DataFrame  # one row per contender and seed
    summary: pd.DataFrame  # one row per contender: medians and ranges over the seeds
    overhead: pd.DataFrame  # MLflow logging time over trial time, per contender
    curves: pd.DataFrame  # best validation accuracy so far, per contender and seed


def tuning_race(
    budget_minutes: float = 10.0,
    seeds: int = 3,
    source: Path | None = None,
    contenders: tuple[Contender, ...] = CONTENDERS,
    title: str = "Tuning race on the default study",
) -> Race:
    """Run every contender (the race's, or the `ABLATION`'s cells) for `budget_minutes` of
    wall clock under each of `seeds` seeds (the study's seed, plus 1, plus 2, ...); `title`
    heads the plot of best-so-far curves logged to each contender's parent run."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    definition = study_file.load(source or config.default_study_file())
    folder = config.project_dir() / "bench" / "results" / "race"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parents = {}
    total = seeds * len(contenders)
    for index in range(seeds):
        seed = definition.study.seed + index
        for contender in contenders:
            # Keras Tuner's study name gets "-keras-tuner-hyperband" added by its engine.
            suffix = f"-{contender.slug}" if contender.engine == "optuna" else ""
            race_definition = dataclasses.replace(
                definition,
                training=contender.training(definition.training),
                study=dataclasses.replace(
                    definition.study,
                    name=f"race-{stamp}-seed{seed}{suffix}",
                    seed=seed,
                    sampler=contender.sampler or definition.study.sampler,
                    pruner=contender.pruner or definition.study.pruner,
                    n_trials=10_000,  # The clock is the only budget.
                    timeout_minutes=budget_minutes,
                ),
            )
            count = f"{len(parents) + 1} of {total}"
            log.info(f"\n== race {count}: {contender.name}, seed {seed}, {budget_minutes:g} min ==")
            if contender.engine == "optuna":
                outcome = optuna_search.run(
                    race_definition,
                    storage=f"sqlite:///{folder / (race_definition.study.name + '.db')}",
                    register=False,
                    experiment=RACE_EXPERIMENT,
                )
            else:
                outcome = keras_tuner_search.run(
                    race_definition,
                    "hyperband",
                    register=False,
                    experiment=RACE_EXPERIMENT,
                    directory=folder / race_definition.study.name,
                )
            done = (
                f"{outcome.trials} trials, best validation "
                f"{outcome.best.validation_accuracy:.4f}, test {outcome.test_accuracy:.4f}"
            )
            log.info(f"== {contender.name}, seed {seed}: {done}")
            parents[contender.name, seed] = outcome.parent_run_id
    passes = keras_tuner_search.whole_passes(definition.training).max_epochs
    trials, curves = _race_trials(parents, passes)
    runs = _runs_table(trials, curves, parents)
    race = Race(runs, summarise(runs), _overhead_table(trials), curves)
    for parent_id in parents.values():
        mlflow.MlflowClient().log_figure(
            parent_id, plot_race(curves, title), "race/best_so_far.png"
        )
    return race


def _race_trials(parents: dict, max_epochs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial run, and every epoch's validation accuracy with its minutes since
    the contender's start (from MLflow)."""
    client = mlflow.MlflowClient()
    rows, points = [], []
    for (contender, seed), parent_id in parents.items():
        parent = client.get_run(parent_id)
        runs = tracking.child_runs(parent_id)
        tags = [run.data.tags for run in runs]
        dropped = keras_tuner_search.dropped_by_successive_halving(tags, max_epochs)
        continuations = {t["trial_number"] for t in tags if "hyperband_trial_id" in t}
        for run in runs:
            tags, metrics = run.data.tags, run.data.metrics
            number = int(tags["trial_number"])
            state = "PRUNED" if number in dropped else tags.get("state", "RUNNING")
            rows.append(
                {
                    "contender": contender,
                    "seed": seed,
                    "trial": number,
                    "state": state,
                    # A Hyperband trial that continues another is not a new configuration.
                    "new_configuration": tags["trial_number"] not in continuations,
                    "trial_seconds": metrics.get("trial_seconds", np.nan),
                    "tracking_seconds": metrics.get("tracking_seconds", np.nan),
                    "matrix_evaluation_seconds": metrics.get("matrix_evaluation_seconds", np.nan),
                }
            )
            for point in client.get_metric_history(run.info.run_id, config.OBJECTIVE_METRIC):
                points.append(
                    {
                        "contender": contender,
                        "seed": seed,
                        "minutes": (point.timestamp - parent.info.start_time) / 60_000,
                        config.OBJECTIVE_METRIC: point.value,
                    }
                )
    curves = pd.DataFrame(points).sort_values(["contender", "seed", "minutes"])
    curves["best_val_accuracy"] = curves.groupby(["contender", "seed"])[
        config.OBJECTIVE_METRIC
    ].cummax()
    return pd.DataFrame(rows), curves


def _minutes_column(target: float) -> str:
    return f"minutes_to_{target:.3f}"


def _runs_table(trials: pd.DataFrame, curves: pd.DataFrame, parents: dict) -> pd.DataFrame:
    client = mlflow.MlflowClient()
    rows = []
    for (contender, seed), parent_id in parents.items():
        own = trials[(trials["contender"] == contender) & (trials["seed"] == seed)]
        states = own["state"].value_counts()
        curve = curves[(curves["contender"] == contender) & (curves["seed"] == seed)]
        row = {
            "contender": contender,
            "seed": seed,
            "configurations": int(own["new_configuration"].sum()),
            "trials_started": int(states.sum()),
            "completed": int(states.get("COMPLETE", 0)),
            "pruned": int(states.get("PRUNED", 0)),
            "failed": int(states.get("FAIL", 0)),
            "best_val_accuracy": round(float(curve["best_val_accuracy"].max()), 4),
        }
        for target in RACE_TARGETS:
            reached = curve[curve["best_val_accuracy"] >= target]
            row[_minutes_column(target)] = (
                round(float(reached["minutes"].iloc[0]), 2) if len(reached) else np.nan
            )
        row["test_accuracy_of_best"] = round(
            client.get_run(parent_id).data.metrics["test_accuracy"], 4
        )
        rows.append(row)
    return pd.DataFrame(rows)


SUMMARISED = (
    "configurations",
    *(_minutes_column(target) for target in RACE_TARGETS),
    "best_val_accuracy",
    "test_accuracy_of_best",
)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per contender, the median of each measure over its seeds and its range (min-max); a
    time to a target that some seed never reached counts as not reached (its median too, when
    half or more of the seeds did not reach it)."""
    rows = []
    for contender, own in runs.groupby("contender", sort=False):
        row = {"contender": contender, "seeds": len(own)}
        for column in SUMMARISED:
            values = own[column].to_numpy(dtype=float)
            values = np.where(np.isnan(values), np.inf, values)  # not reached: after any time
            median = float(np.median(values))
            row[column] = median if np.isfinite(median) else np.nan
            low, high = values.min(), values.max()
            row[f"{column}_range"] = "-".join(
                f"{value:g}" if np.isfinite(value) else "not reached" for value in (low, high)
            )
        rows.append(row)
    return pd.DataFrame(rows)


def compare(summary: pd.DataFrame, reference: str) -> str:
    """Each contender against `reference`, on the medians over seeds: configurations and
    minutes to each target (with their ratios to the reference's), best validation accuracy and
    the test accuracy of its best model. The race compares with Keras Tuner Hyperband (issue
    13's targets: at least 2x its configurations, at most 0.7x its time to 99.3%); the
    ablation with the default study."""
    rows = summary.set_index("contender")
    base = rows.loc[reference]

    def measure(row: pd.Series, column: str, unit: str) -> str:
        if np.isnan(row[column]):
            return "not reached"
        ratio = row[column] / base[column] if base[column] > 0 else np.nan
        number = f"{row[column]:g}" if column == "configurations" else f"{row[column]:.2f}"
        value = f"{number}{unit}" + (f" ({ratio:.2f}x)" if np.isfinite(ratio) else "")
        return value if column == "configurations" else f"in {value}"

    lines = [f"medians of {int(base['seeds'])} seed(s), ratios to {reference}'s:"]
    for name, row in rows.iterrows():
        times = (f"{t:.1%} {measure(row, _minutes_column(t), ' min')}" for t in RACE_TARGETS)
        lines.append(
            f"  {name}: {measure(row, 'configurations', ' configurations')}, "
            + ", ".join(times)
            + f", best validation {row['best_val_accuracy']:.4f}, "
            f"test of its best {row['test_accuracy_of_best']:.4f}"
        )
    return "\n".join(lines)


def _overhead_table(trials: pd.DataFrame) -> pd.DataFrame:
    """MLflow logging time over trial wall time, and the validation pass that the logged
    confusion matrix needs, per contender (trials that ran to an end)."""
    ended = trials.dropna(subset=["trial_seconds", "tracking_seconds"])
    table = (
        ended.groupby("contender", sort=False)
        .agg(
            trials=("trial", "count"),
            median_trial_seconds=("trial_seconds", "median"),
            median_tracking_seconds=("tracking_seconds", "median"),
            total_trial_seconds=("trial_seconds", "sum"),
            total_tracking_seconds=("tracking_seconds", "sum"),
            total_matrix_evaluation_seconds=("matrix_evaluation_seconds", "sum"),
        )
        .reset_index()
    )
    table["tracking_percent"] = 100 * table.total_tracking_seconds / table.total_trial_seconds
    table["matrix_evaluation_percent"] = (
        100 * table.total_matrix_evaluation_seconds / table.total_trial_seconds
    )
    return table.round(2)


def plot_race(curves: pd.DataFrame, title: str = "Tuning race on the default study") -> Figure:
    """Best validation accuracy so far against minutes: a line per seed, a colour per contender."""
    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.subplots()
    for index, (contender, own) in enumerate(curves.groupby("contender", sort=False)):
        for number, (_, curve) in enumerate(own.groupby("seed")):
            label = contender if number == 0 else None
            x, y = curve["minutes"], curve["best_val_accuracy"]
            axes.step(x, y, where="post", color=f"C{index}", lw=1.8, alpha=0.85, label=label)
    for target in RACE_TARGETS:
        axes.axhline(target, color="grey", ls="--", lw=1)
        axes.annotate(f"{target:.1%}", (0, target), color="grey", va="bottom", fontsize=8)
    low = max(0.95, float(curves["best_val_accuracy"].min()) - 0.002)
    axes.set_ylim(low, 1.0)
    axes.set_xlabel("minutes since the contender started")
    axes.set_ylabel("best validation accuracy so far")
    seeds = curves["seed"].nunique()
    axes.set_title(f"{title}, equal wall-clock budget, {seeds} seed(s)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure
