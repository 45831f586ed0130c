"""The tuning race: each contender tunes the default study for the same wall-clock budget.

    digitune bench --only race --budget-minutes 10

Contenders: Optuna TPE with median pruning (the default study), Optuna's random sampler
without pruning, and Keras Tuner Hyperband, one after the other on fresh stores. The race's
table, the tracking overhead and the best-so-far curves are read back from MLflow.
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

from digitune import config, space, tracking
from digitune.engines import keras_tuner as keras_tuner_engine
from digitune.engines import optuna as optuna_engine

log = logging.getLogger(__name__)

RACE_EXPERIMENT = "tuning-race"
RACE_TARGET = 0.99


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    engine: str
    sampler: str = "tpe"
    pruner: str = "median"


CONTENDERS = (
    Contender("Optuna TPE + median pruning", "optuna"),
    Contender("Optuna random, no pruning", "optuna", sampler="random", pruner="none"),
    Contender("Keras Tuner Hyperband", "keras-tuner"),
)


def tuning_race(
    budget_minutes: float = 10.0, study_file: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Each contender tunes the default study for `budget_minutes` of wall clock, one after
    the other on this machine, from fresh state, tracked in MLflow's `tuning-race`
    experiment (nothing is registered). Returns (race table, tracking-overhead table,
    best-so-far curves), all read back from what the contenders logged to MLflow."""
    definition = space.load(study_file or config.default_study_file())
    folder = config.project_dir() / "bench" / "results" / "race"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parents = {}
    for contender in CONTENDERS:
        # Keras Tuner's study name gets "-keras-tuner-hyperband" added by its engine.
        suffix = f"-{contender.sampler}" if contender.engine == "optuna" else ""
        race_definition = dataclasses.replace(
            definition,
            study=dataclasses.replace(
                definition.study,
                name=f"race-{stamp}{suffix}",
                sampler=contender.sampler,
                pruner=contender.pruner,
                n_trials=10_000,  # The clock is the only budget.
                timeout_minutes=budget_minutes,
            ),
        )
        log.info("\n== %s: %g minutes ==", contender.name, budget_minutes)
        if contender.engine == "optuna":
            outcome = optuna_engine.run(
                race_definition,
                storage=f"sqlite:///{folder / (race_definition.study.name + '.db')}",
                register=False,
                experiment=RACE_EXPERIMENT,
            )
        else:
            outcome = keras_tuner_engine.run(
                race_definition,
                "hyperband",
                register=False,
                experiment=RACE_EXPERIMENT,
                directory=folder / race_definition.study.name,
            )
        parents[contender.name] = outcome.parent_run_id
    trials, curves = _race_trials(parents, definition.training.max_epochs)
    return _race_table(trials, curves, parents), _overhead_table(trials), curves


def _race_trials(parents: dict, max_epochs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial run, and every epoch's validation accuracy with its time since the
    contender's start, from the MLflow store."""
    client = mlflow.MlflowClient()
    rows, points = [], []
    for contender, parent_id in parents.items():
        parent = client.get_run(parent_id)
        runs = tracking.child_runs(parent_id)
        dropped = keras_tuner_engine.dropped_by_successive_halving(
            [run.data.tags for run in runs], max_epochs
        )
        for run in runs:
            tags, metrics = run.data.tags, run.data.metrics
            number = int(tags["trial_number"])
            state = "PRUNED" if number in dropped else tags.get("state", "RUNNING")
            rows.append(
                {
                    "contender": contender,
                    "trial": number,
                    "state": state,
                    "trial_seconds": metrics.get("trial_seconds", np.nan),
                    "tracking_seconds": metrics.get("tracking_seconds", np.nan),
                    "matrix_evaluation_seconds": metrics.get("matrix_evaluation_seconds", np.nan),
                }
            )
            for point in client.get_metric_history(run.info.run_id, config.OBJECTIVE_METRIC):
                points.append(
                    {
                        "contender": contender,
                        "minutes": (point.timestamp - parent.info.start_time) / 60_000,
                        config.OBJECTIVE_METRIC: point.value,
                    }
                )
    curves = pd.DataFrame(points).sort_values(["contender", "minutes"])
    curves["best_val_accuracy"] = curves.groupby("contender")[config.OBJECTIVE_METRIC].cummax()
    return pd.DataFrame(rows), curves


def _race_table(trials: pd.DataFrame, curves: pd.DataFrame, parents: dict) -> pd.DataFrame:
    client = mlflow.MlflowClient()
    rows = []
    for contender, parent_id in parents.items():
        states = trials[trials["contender"] == contender]["state"].value_counts()
        curve = curves[curves["contender"] == contender]
        reached = curve[curve["best_val_accuracy"] >= RACE_TARGET]
        metrics = client.get_run(parent_id).data.metrics
        rows.append(
            {
                "contender": contender,
                "trials_started": int(states.sum()),
                "completed": int(states.get("COMPLETE", 0)),
                "pruned": int(states.get("PRUNED", 0)),
                "failed": int(states.get("FAIL", 0)),
                "best_val_accuracy": round(float(curve["best_val_accuracy"].max()), 4),
                f"minutes_to_{RACE_TARGET:.3f}": (
                    round(float(reached["minutes"].iloc[0]), 2) if len(reached) else np.nan
                ),
                "test_accuracy_of_best": round(metrics["test_accuracy"], 4),
            }
        )
    return pd.DataFrame(rows)


def race_summary(race: pd.DataFrame) -> str:
    """The race's targets in words: Optuna's time to the target over Hyperband's, and
    whether its best model is at least as accurate on the test set."""
    rows = race.set_index("contender")
    optuna_row, hyperband_row = rows.loc[CONTENDERS[0].name], rows.loc[CONTENDERS[2].name]
    column = f"minutes_to_{RACE_TARGET:.3f}"
    if np.isnan(optuna_row[column]) or np.isnan(hyperband_row[column]):
        timing = f"time to {RACE_TARGET:.1%}: not reached by both within the budget"
    else:
        ratio = optuna_row[column] / hyperband_row[column]
        timing = (
            f"time to {RACE_TARGET:.1%}: Optuna {optuna_row[column]:.2f} min, Hyperband "
            f"{hyperband_row[column]:.2f} min, ratio {ratio:.2f} (target at most 0.7)"
        )
    accuracy = (
        f"test accuracy of the best model: Optuna {optuna_row['test_accuracy_of_best']:.4f}, "
        f"Hyperband {hyperband_row['test_accuracy_of_best']:.4f}"
    )
    return f"{timing}\n{accuracy}"


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


def plot_race(curves: pd.DataFrame) -> Figure:
    """Best validation accuracy so far against minutes since each contender started."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for contender, curve in curves.groupby("contender", sort=False):
        axes.step(curve["minutes"], curve["best_val_accuracy"], where="post", label=contender, lw=2)
    axes.axhline(RACE_TARGET, color="grey", ls="--", lw=1, label=f"{RACE_TARGET:.1%}")
    low = max(0.95, float(curves["best_val_accuracy"].min()) - 0.002)
    axes.set_ylim(low, 1.0)
    axes.set_xlabel("minutes since the contender started")
    axes.set_ylabel("best validation accuracy so far")
    axes.set_title("Tuning race on the default study, equal wall-clock budget")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure
