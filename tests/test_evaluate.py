"""Evaluation: the confusion matrix against scikit-learn's, and the figure a user looks at."""

from __future__ import annotations

import numpy as np
from sklearn import metrics

from digitune import evaluate


def test_confusion_matrix_matches_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, 5000)
    y_pred = np.where(rng.random(5000) < 0.8, y_true, rng.integers(0, 10, 5000))
    np.testing.assert_array_equal(
        evaluate.confusion_matrix(y_true, y_pred),
        metrics.confusion_matrix(y_true, y_pred, labels=range(10)),
    )


def test_confusion_matrix_by_hand():
    matrix = evaluate.confusion_matrix([0, 0, 1, 9], [0, 1, 1, 4])
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1 and matrix[1, 1] == 1 and matrix[9, 4] == 1
    assert matrix.sum() == 4


def test_evaluation_summary():
    result = evaluate.Evaluation(
        accuracy=0.75,
        confusion_matrix=evaluate.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 2]),
        probabilities=np.zeros((4, 10)),
    )
    summary = result.as_dict()
    assert summary["per_class_accuracy"][:3] == [0.5, 1.0, 1.0]
    assert summary["confusion_matrix"][0][:2] == [1, 1]


def test_confusion_matrix_figure_is_labelled():
    matrix = evaluate.confusion_matrix([0, 1, 2, 2], [0, 1, 2, 1])
    figure = evaluate.plot_confusion_matrix(matrix, "validation set")
    axes = figure.axes[0]
    assert axes.get_xlabel() == "predicted digit" and axes.get_ylabel() == "true digit"
    assert "validation set" in axes.get_title() and "75.00%" in axes.get_title()
    evaluate.plt.close(figure)
