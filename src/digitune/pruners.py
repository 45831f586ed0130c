"""Pruners: Optuna's, chosen by the study file's `pruner`, and successive halving that judges a
running trial again until it reaches its next rung.

Optuna's asynchronous successive halving (ASHA) judges a trial once per rung, when it arrives,
against the trials that arrived before it; the first trials to arrive meet no competitor, so
they are promoted, rung after rung. On a CPU where a full trial takes most of the budget, the
first trial of each worker then runs to the end and the study sees four or five
configurations. `RejudgingSuccessiveHalvingPruner` asks ASHA's question at every report after
a rung instead of only on arrival: is this trial still among the best third (at least the
best one) of the trials that reached its last rung? A trial promoted only because it came
first stops as soon as better ones catch up with it at that rung, at equal training, and its
worker starts a new configuration. Trials past a later rung are not judged again at earlier
ones.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from digitune import config

JUDGED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class RejudgingSuccessiveHalvingPruner(optuna.pruners.BasePruner):
    """Successive halving with rungs at steps `min_resource * reduction_factor ** k`, where a
    trial continues while its value at the last rung it passed is among the best
    1/`reduction_factor` of all values recorded at that rung (the best one while fewer than
    `reduction_factor` trials reached it). Every study direction is "maximize" or "minimize"."""

    def __init__(self, min_resource: int = 1, reduction_factor: int = 3) -> None:
        if min_resource < 1 or reduction_factor < 2:
            raise ValueError(
                f"successive halving needs min_resource >= 1 and reduction_factor >= 2, got "
                f"{min_resource} and {reduction_factor}"
            )
        self.min_resource, self.reduction_factor = min_resource, reduction_factor

    def last_rung(self, step: int) -> int | None:
        """The step of the last rung at or before `step`; None before the first rung."""
        if step < self.min_resource:
            return None
        rung = self.min_resource
        while rung * self.reduction_factor <= step:
            rung *= self.reduction_factor
        return rung

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        if math.isnan(trial.intermediate_values[step]):
            return True
        rung = self.last_rung(step)
        if rung is None or rung not in trial.intermediate_values:
            return False
        competing = [
            other.intermediate_values[rung]
            for other in study.get_trials(deepcopy=False, states=JUDGED_STATES)
            if rung in other.intermediate_values and other.number != trial.number
        ]
        return not self.promotable(trial.intermediate_values[rung], competing, study.direction)

    def promotable(
        self, value: float, others: list[float], direction: optuna.study.StudyDirection
    ) -> bool:
        """Whether `value` is among the best 1/reduction_factor of itself and `others`
        (NaN counts as the worst), and at least the best one."""
        sign = 1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        better = sum(1 for other in others if not math.isnan(other) and sign * other > sign * value)
        kept = max(1, (len(others) + 1) // self.reduction_factor)
        return better < kept


def make_pruner(settings: config.StudySettings, max_epochs: int) -> optuna.pruners.BasePruner:
    """The pruner the study file's [study] `pruner` names; steps are epoch indices, so rung 0
    is judged after epoch `pruner_warmup_epochs` + 1."""
    min_resource = max(1, settings.pruner_warmup_epochs)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    if settings.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3)
    if settings.pruner == "rejudging_successive_halving":
        return RejudgingSuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3)
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.pruner_startup_trials,
        n_warmup_steps=settings.pruner_warmup_epochs,
    )
