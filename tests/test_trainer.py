"""The trainer's verdict on a finished training: blown up (FAIL with a reason) or merely slow."""

from __future__ import annotations

import numpy as np
import pytest

from digitune import trainer

PARAMS = {"learning_rate": 1e30}


def _matrix(predicted_counts: list[int]) -> np.ndarray:
    """A confusion matrix whose columns (predicted digits) hold these counts."""
    matrix = np.zeros((10, 10), dtype=int)
    for digit, count in enumerate(predicted_counts):
        matrix[digit, digit] = count
    return matrix


ONE_CLASS = _matrix([0, 300, 0, 0, 0, 0, 0, 0, 0, 0])
VARIED = _matrix([30] * 10)


def test_a_non_finite_loss_fails_with_the_learning_rate():
    with pytest.raises(trainer.DivergedError, match=r"learning_rate=1e\+30 is probably too high"):
        trainer.check_learned({"loss": [2.1, float("nan")]}, PARAMS, VARIED)


@pytest.mark.parametrize(
    "losses",
    [
        [14.5, 14.5, 14.5],  # stuck far above a uniform guess (log 10 = 2.30)
        [14.5, 14.3, 14.6],  # ... and wandering
        [2.31, 2.31, 2.32],  # stuck where it started
    ],
)
def test_a_network_collapsed_to_one_class_fails(losses):
    # What bfloat16 on an AMX Xeon gave for learning_rate=1e30: no NaN, one digit predicted.
    with pytest.raises(trainer.DivergedError, match="collapsed to predicting digit 1 for 100%"):
        trainer.check_learned({"loss": losses}, PARAMS, ONE_CLASS)


@pytest.mark.parametrize(
    ("losses", "matrix"),
    [
        ([2.303, 2.301], ONE_CLASS),  # slow: one class so far, but the loss falls
        ([2.30], ONE_CLASS),  # one epoch, no worse than a guess
        ([0.5, 0.6, 0.7], VARIED),  # the loss rose, but the network tells digits apart
        ([20.0, 25.0], VARIED),
    ],
)
def test_a_slow_or_working_network_is_left_to_the_pruner(losses, matrix):
    trainer.check_learned({"loss": losses}, PARAMS, matrix)
