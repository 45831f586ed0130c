"""The study report's figures, on a study built from recorded trials (no training)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import optuna
import pytest

from digitune import report


@pytest.fixture(autouse=True)
def close_figures():
    """`report.figures` hands its figures to the caller, who closes them (as `log_to_run`
    does); these tests look at them and close them after, or pyplot keeps them all."""
    yield
    plt.close("all")


def _study_with_curves(curves: list[dict[int, float]]) -> optuna.Study:
    study = optuna.create_study(study_name="curves", direction="maximize")
    distribution = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for number, curve in enumerate(curves):
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": 1e-3 * (number + 1)},
                distributions={"learning_rate": distribution},
                value=max(curve.values()),
                intermediate_values=curve,
            )
        )
    return study


def test_pruning_curves_are_drawn_where_trials_ended():
    # Batch-normalised networks often start far below where every trial ends (here 0.16),
    # which would flatten the curves between 0.985 and 0.996 that pruning compares.
    study = _study_with_curves(
        [
            {0: 0.16, 1: 0.31, 2: 0.985, 3: 0.9886},
            {0: 0.62, 1: 0.990, 2: 0.994, 3: 0.9959},
        ]
    )
    figure = report.figures(study, {})["intermediate_values.png"]
    low, high = figure.axes[0].get_ylim()
    assert 0.98 < low < 0.9886
    assert 0.9959 < high < 1.0
    assert figure.axes[0].get_ylabel() == "validation accuracy"


def test_pruning_curves_keep_a_trial_that_ended_low_in_view():
    study = _study_with_curves([{0: 0.3}, {0: 0.9, 1: 0.95}])
    low, high = report.figures(study, {})["intermediate_values.png"].axes[0].get_ylim()
    assert low < 0.3 and high > 0.95
    assert low == pytest.approx(0.3 - 0.065)


def _study_where_only_the_learning_rate_matters() -> optuna.Study:
    """30 recorded trials whose value is a function of the learning rate alone: dropout is
    noise. Any sound importance measure ranks the learning rate first, by far."""
    import math

    import numpy as np

    study = optuna.create_study(study_name="known", direction="maximize")
    rng = np.random.default_rng(0)
    distributions = {
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "dropout_rate": optuna.distributions.FloatDistribution(0.0, 0.5),
    }
    for _ in range(30):
        learning_rate, dropout_rate = 10 ** rng.uniform(-4, -2), rng.uniform(0.0, 0.5)
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": learning_rate, "dropout_rate": dropout_rate},
                distributions=distributions,
                value=0.9 + 0.02 * math.log10(learning_rate),
            )
        )
    return study


def test_importances_rank_the_parameter_that_decides_the_value():
    study = _study_where_only_the_learning_rate_matters()
    ranked = report.importances(study)
    assert list(ranked) == ["learning_rate", "dropout_rate"]
    assert ranked["learning_rate"] > 0.9
    printed = report.summary(study, ranked).splitlines()
    section = printed[printed.index("parameter importances (fANOVA):") + 1 :]
    assert section[0].split()[0] == "learning_rate" and section[1].split()[0] == "dropout_rate"
    # The figure shows the same ranking: its bars are labelled with the parameters.
    figure = report.figures(study, ranked)["param_importances.png"]
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert set(labels) == {"learning_rate", "dropout_rate"}


def test_the_history_figure_shows_every_trial_and_the_best_so_far():
    study = _study_where_only_the_learning_rate_matters()
    figure = report.figures(study, report.importances(study))["optimization_history.png"]
    axes = figure.axes[0]
    points = [collection.get_offsets() for collection in axes.collections]
    values = sorted(trial.value for trial in study.trials)
    # One point per trial, at its value; and a line that climbs to the best value.
    assert any(sorted(p[:, 1].tolist()) == pytest.approx(values) for p in points if len(p) == 30)
    best_line = [line.get_ydata() for line in axes.get_lines() if len(line.get_ydata()) == 30]
    assert best_line and max(best_line[0]) == pytest.approx(values[-1])
    assert list(best_line[0]) == sorted(best_line[0])
