"""Evaluation: the confusion matrix against scikit-learn's, and the figure a user looks at."""

from __future__ import annotations

import io

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


def test_the_counts_are_drawn_in_their_cells_and_the_labels_within_the_figure():
    # Long class names (rotated) beside ten classes' counts, as a folder study draws them.
    names = tuple(f"class number {i}" for i in range(10))
    rng = np.random.default_rng(0)
    matrix = rng.integers(1, 40, (10, 10)) + np.diag(np.full(10, 900))
    figure = evaluate.plot_confusion_matrix(matrix, "validation set", names)
    figure.savefig(io.BytesIO(), format="png")
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    cells = axes.get_window_extent(renderer)
    counts = {text.get_text(): text.get_window_extent(renderer) for text in axes.texts}
    assert len(axes.texts) == 100 and str(matrix[3, 7]) in counts
    assert all(cells.contains(*box.min) and cells.contains(*box.max) for box in counts.values())
    labels = axes.get_xticklabels() + axes.get_yticklabels() + [axes.title, axes.xaxis.label]
    for label in labels:
        box = label.get_window_extent(renderer)
        assert figure.bbox.contains(*box.min) and figure.bbox.contains(*box.max), label
    evaluate.plt.close(figure)
