"""Accuracy against deployment costs: a study's objectives, its Pareto front, picking a model.

A study file's [objectives] table (`config.ObjectiveSettings`) makes a study either
- multi-objective: maximise validation accuracy and minimise the listed costs (`minimize`);
  Optuna's TPE or NSGA-II sampler searches the front, and trials are not pruned (Optuna
  cannot prune a multi-objective trial), so such studies train small models for few epochs;
- or constrained: maximise validation accuracy subject to `max_<cost>` limits, each recorded
  on the trial with Optuna's `Trial.set_constraint` (which Optuna 5 prefers to a sampler's
  `constraints_func`), so that TPE and NSGA-II sample away from infeasible configurations and
  `best_trial` is the best feasible one. These trials are pruned as any other.
Both may be combined. Every completed trial of such a study records its costs
(`digitune.costs`) as user attributes and as metrics of its MLflow run.

The front here is over validation accuracy and the minimised costs (the parameter count when
a study minimises none), among completed trials within every limit: `front`. `choose` takes
the most accurate front trial within a user's limits, for `digitune select`.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from digitune import config  # noqa: E402

ACCURACY = config.OBJECTIVE_METRIC
# The user attribute holding a completed trial's measured costs.
COSTS_ATTR = "costs"
# How each cost reads in a table or on an axis.
LABELS = {
    "params": "parameters",
    "int8_kb": "int8 TFLite KB",
    "latency_ms": "latency ms (1 image, 1 thread)",
}


def directions(settings: config.ObjectiveSettings) -> list[str]:
    """Optuna's directions: accuracy up, then each minimised cost down."""
    return ["maximize", *["minimize"] * len(settings.minimize)]


def metric_names(settings: config.ObjectiveSettings) -> list[str]:
    return [ACCURACY, *settings.minimize]


def front_costs(settings: config.ObjectiveSettings) -> list[str]:
    """The costs the front is over: those minimised, or the parameter count."""
    return list(settings.minimize) or ["params"]


def values(accuracy: float, costs: dict[str, float], settings: config.ObjectiveSettings):
    """What a trial returns to Optuna: its accuracy, or accuracy and the minimised costs."""
    if not settings.minimize:
        return accuracy
    return [accuracy, *(costs[name] for name in settings.minimize)]


def violations(costs: dict[str, float], settings: config.ObjectiveSettings) -> dict[str, float]:
    """How far over each limit a trial's costs are (<= 0 within it), for `set_constraint`."""
    return {f"max_{name}": costs[name] - limit for name, limit in settings.limits.items()}


def version_tags(costs: dict[str, float] | None) -> dict[str, str]:
    """A registered version's tags for its costs (none for a model without)."""
    if not costs:
        return {}
    return {
        "params": f"{costs['params']:.0f}",
        "int8_kb": f"{costs['int8_kb']:.1f}",
        "latency_ms": f"{costs['latency_ms']:.3f}",
        "latency_iqr_ms": f"{costs['latency_iqr_ms']:.3f}",
    }


def accuracy(trial: optuna.trial.FrozenTrial) -> float | None:
    """A trial's validation accuracy, in a single- or multi-objective study."""
    return trial.values[0] if trial.values else None


def costs_text(trial: optuna.trial.FrozenTrial) -> str:
    """A trial's costs for its one line in the terminal ("" without)."""
    costs = trial.user_attrs.get(COSTS_ATTR)
    if not costs:
        return ""
    return (
        f" params={costs['params']:,.0f} int8={costs['int8_kb']:.1f}KB "
        f"latency={costs['latency_ms']:.3f}ms"
    )


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The most accurate completed trial within every limit (of the front when there are
    several objectives). ValueError when there is none."""
    if len(study.directions) == 1:
        return study.best_trial
    front = study.best_trials
    if not front:
        raise ValueError(f"study '{study.study_name}' has no completed trial within its limits")
    return max(front, key=lambda trial: (trial.values[0], -trial.number))


def table(study: optuna.Study) -> pd.DataFrame:
    """One row per completed trial that measured its costs: number, validation accuracy, the
    costs, the latency's spread and threads, and whether it is within every limit."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        measured = trial.user_attrs.get(COSTS_ATTR)
        if not measured:
            continue
        rows.append(
            {
                "trial": trial.number,
                ACCURACY: accuracy(trial),
                **measured,
                "feasible": all(value <= 0 for value in trial.constraints.values()),
            }
        )
    columns = ["trial", ACCURACY, *config.COSTS, "latency_iqr_ms", "latency_threads", "feasible"]
    return pd.DataFrame(rows, columns=columns)


def front(trials: pd.DataFrame, costs: list[str]) -> pd.DataFrame:
    """The feasible rows no other feasible row dominates (at least as accurate and as cheap
    in every cost, better in one), most accurate first."""
    feasible = trials[trials["feasible"].astype(bool)]
    scores = pd.concat([-feasible[ACCURACY], feasible[costs]], axis=1).to_numpy()
    keep = [
        not any((other <= row).all() and (other < row).any() for other in scores) for row in scores
    ]
    return feasible[keep].sort_values([ACCURACY, *costs], ascending=[False, *[True] * len(costs)])


def choose(trials: pd.DataFrame, costs: list[str], limits: dict[str, float]) -> pd.Series:
    """The most accurate front trial within `limits` ({cost: at most}); a ValueError that says
    what the front offers when none fits."""
    candidates = front(trials, costs)
    if candidates.empty:
        raise ValueError("the study has no completed trial within its own limits yet")
    fits = candidates
    for cost, limit in limits.items():
        fits = fits[fits[cost] <= limit]
    if fits.empty:
        cheapest = ", ".join(
            f"{LABELS[cost]} {candidates[cost].min():,.6g} (trial "
            f"{int(candidates.loc[candidates[cost].idxmin(), 'trial'])})"
            for cost in limits
        )
        wanted = ", ".join(f"{LABELS[cost]} <= {limit:,.6g}" for cost, limit in limits.items())
        raise ValueError(
            f"no Pareto-front model has {wanted}; the front's cheapest: {cheapest}. "
            "Loosen the limit, or tune smaller models"
        )
    return fits.iloc[0]


def as_text(rows: pd.DataFrame) -> str:
    """The front as a table a person reads: accuracy, costs and the latency's spread."""
    shown = pd.DataFrame(
        {
            "trial": rows["trial"].astype(int),
            ACCURACY: rows[ACCURACY].map("{:.4f}".format),
            "params": rows["params"].map("{:,.0f}".format),
            "int8 KB": rows["int8_kb"].map("{:.1f}".format),
            "latency ms": [
                f"{median:.3f} ± {spread / 2:.3f}"
                for median, spread in zip(rows["latency_ms"], rows["latency_iqr_ms"], strict=True)
            ],
        }
    )
    return shown.to_markdown(
        index=False, colalign=["right"] * len(shown.columns), disable_numparse=True
    )


def plot(trials: pd.DataFrame, settings: config.ObjectiveSettings, title: str) -> plt.Figure:
    """Validation accuracy against each cost of the front (and each limited cost): every
    trial, the front joined up, infeasible trials crossed, the limits as dashed lines."""
    costs = list(dict.fromkeys([*front_costs(settings), *settings.limits]))
    figure, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 5), squeeze=False)
    best = front(trials, front_costs(settings))
    feasible = trials["feasible"].astype(bool)
    for axis, cost in zip(axes[0], costs, strict=True):
        axis.scatter(
            trials.loc[feasible, cost],
            trials.loc[feasible, ACCURACY],
            s=18,
            color="tab:gray",
            alpha=0.6,
            label="trial",
        )
        if (~feasible).any():
            axis.scatter(
                trials.loc[~feasible, cost],
                trials.loc[~feasible, ACCURACY],
                s=22,
                marker="x",
                color="tab:red",
                label="over a limit",
            )
        ordered = best.sort_values(cost)
        axis.plot(ordered[cost], ordered[ACCURACY], "o-", color="tab:blue", label="Pareto front")
        for row in ordered.itertuples():
            axis.annotate(
                str(row.trial),
                (getattr(row, cost), getattr(row, ACCURACY)),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if cost in settings.limits:
            axis.axvline(
                settings.limits[cost],
                color="tab:red",
                linestyle="--",
                label=f"max_{cost} = {settings.limits[cost]:,.6g}",
            )
        if cost == "params":
            axis.set_xscale("log")
        axis.set_xlabel(LABELS[cost])
        axis.set_ylabel("validation accuracy")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
