"""The re-judging successive-halving pruner on real Optuna studies, with Optuna's asynchronous
successive halving as the reference for what stays the same (rungs, the best third) and what
changes (a trial is judged again until its next rung)."""

from __future__ import annotations

import math

import optuna
import pytest

from digitune import config, pruners


def _study(pruner: optuna.pruners.BasePruner) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize", pruner=pruner)


def _report(trial: optuna.Trial, values: list[float]) -> bool:
    """Report `values` from the trial's next step on; whether the pruner stops it after the
    last one."""
    start = len(trial.study.trials[trial.number].intermediate_values)
    for step, value in enumerate(values, start):
        trial.report(value, step)
    return trial.should_prune()


def test_rungs_are_those_of_optuna_s_successive_halving():
    pruner = pruners.RejudgingSuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    # Steps are epoch indices; the default study's quarter passes: 25,000, 50,000, 125,000 and
    # 350,000 images.
    assert [pruner.last_rung(step) for step in range(30)] == (
        [None] + [1] * 2 + [3] * 6 + [9] * 18 + [27] * 3
    )
    assert pruners.RejudgingSuccessiveHalvingPruner(min_resource=2).last_rung(5) == 2
    with pytest.raises(ValueError, match="reduction_factor >= 2"):
        pruners.RejudgingSuccessiveHalvingPruner(reduction_factor=1)


@pytest.mark.parametrize("rejudging", [True, False])
def test_a_trial_promoted_for_coming_first_stops_when_a_better_one_reaches_its_rung(rejudging):
    pruner = (
        pruners.RejudgingSuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
        if rejudging
        else optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    )
    study = _study(pruner)
    first, second = study.ask(), study.ask()
    # Rung 0 is step 1. The first to get there meets no competitor: promoted by both pruners.
    assert not _report(first, [0.90, 0.95])
    # The second arrives better at rung 0 and goes on.
    assert not _report(second, [0.92, 0.97])
    # The first, at step 2, is between rung 0 and rung 1: ASHA judged it once, on arrival;
    # re-judged, it is no longer the best at rung 0 of two trials, so it stops.
    assert _report(first, [0.96]) is rejudging


def test_a_trial_is_judged_at_its_last_rung_only_and_the_best_third_goes_on():
    study = _study(pruners.RejudgingSuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
    leader = study.ask()
    # Alone at rung 0 (step 1) and rung 1 (step 3): promoted; now between rung 1 and rung 2.
    assert not _report(leader, [0.90, 0.93, 0.94, 0.95, 0.96])
    # Five newcomers reach rung 0, two of them better than the leader was there.
    rung_0 = {}
    for value in (0.94, 0.91, 0.85, 0.80, 0.95):
        newcomer = study.ask()
        rung_0[value] = _report(newcomer, [value - 0.05, value])
    # Six values at rung 0: the best two go on; each was judged against those before it.
    assert rung_0 == {0.94: False, 0.91: True, 0.85: True, 0.80: True, 0.95: False}
    # The leader is past rung 1, alone there: what happens at rung 0 no longer concerns it.
    assert not _report(leader, [0.965])


def test_a_nan_stops_a_trial_and_ranks_last_among_competitors():
    pruner = pruners.RejudgingSuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    study = _study(pruner)
    assert _report(study.ask(), [0.5, math.nan])
    # The NaN at rung 0 is no competitor: a poor trial still counts as the best of two.
    assert not _report(study.ask(), [0.1, 0.2])
    assert pruner.promotable(0.2, [math.nan, 0.1], optuna.study.StudyDirection.MAXIMIZE)
    assert not pruner.promotable(0.2, [0.3, 0.1], optuna.study.StudyDirection.MAXIMIZE)
    # Minimising, smaller is better.
    assert pruner.promotable(0.1, [0.3, 0.2], optuna.study.StudyDirection.MINIMIZE)


def test_the_study_file_names_the_pruner():
    settings = config.StudySettings(pruner="rejudging_successive_halving", pruner_warmup_epochs=2)
    pruner = pruners.make_pruner(settings, max_epochs=40)
    assert isinstance(pruner, pruners.RejudgingSuccessiveHalvingPruner)
    assert (pruner.min_resource, pruner.reduction_factor) == (2, 3)
    assert isinstance(
        pruners.make_pruner(config.StudySettings(pruner="successive_halving"), max_epochs=40),
        optuna.pruners.SuccessiveHalvingPruner,
    )
