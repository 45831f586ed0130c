"""Evaluate a model on a labelled set: predictions, accuracy and the confusion matrix.

The same code evaluates a trial on the validation set and the final model on the test set.
"""

from __future__ import annotations

import dataclasses
import math

import matplotlib

matplotlib.use("Agg")  # Figures are written to files; no display is needed or wanted.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from digitune import data  # noqa: E402

DIGITS = data.DIGITS
NUM_CLASSES = len(DIGITS)  # MNIST's; other datasets' count comes with their probabilities


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a user looks at: accuracy, the confusion matrix and per-class accuracy."""

    accuracy: float
    confusion_matrix: np.ndarray  # rows: true class, columns: predicted class
    probabilities: np.ndarray
    class_names: tuple[str, ...] = DIGITS

    @property
    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion_matrix.sum(axis=1)
        return np.divide(
            np.diag(self.confusion_matrix), totals, out=np.zeros(len(totals)), where=totals > 0
        )

    def as_dict(self) -> dict:
        """A JSON-ready summary, as logged next to the confusion matrix image."""
        return {
            "accuracy": self.accuracy,
            "labels": list(range(len(self.class_names))),
            "class_names": list(self.class_names),
            "rows": f"true {_kind(self.class_names)}",
            "columns": f"predicted {_kind(self.class_names)}",
            "confusion_matrix": self.confusion_matrix.tolist(),
            "per_class_accuracy": [round(float(v), 6) for v in self.per_class_accuracy],
        }


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """Counts of (true, predicted) pairs, a square integer matrix (10x10 for digits)."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape[0]} labels but {y_pred.shape[0]} predictions")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def _kind(class_names: tuple[str, ...]) -> str:
    return "digit" if tuple(class_names) == DIGITS else "class"


def evaluate(
    model, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000, class_names=None
) -> Evaluation:
    """Predict `images` (already preprocessed) with a Keras model and compare with `labels`;
    `Pictures` a chunk at a time, as they are read."""
    if isinstance(images, data.Pictures):
        parts = [
            model.predict(chunk, batch_size=batch_size, verbose=0) for chunk in images.chunks()
        ]
        probabilities = np.concatenate([np.asarray(part) for part in parts])
    else:
        probabilities = np.asarray(model.predict(images, batch_size=batch_size, verbose=0))
    return from_probabilities(probabilities, labels, class_names)


def from_probabilities(probabilities: np.ndarray, labels: np.ndarray, class_names=None):
    """The evaluation of class probabilities (N, classes) against labels (N,)."""
    probabilities = np.asarray(probabilities)
    predictions = probabilities.argmax(axis=1)
    count = probabilities.shape[1]
    return Evaluation(
        accuracy=float(np.mean(predictions == labels)),
        confusion_matrix=confusion_matrix(labels, predictions, count),
        probabilities=probabilities,
        class_names=tuple(
            class_names or (DIGITS if count == NUM_CLASSES else map(str, range(count)))
        ),
    )


def plot_confusion_matrix(matrix: np.ndarray, title: str, class_names=DIGITS) -> plt.Figure:
    """A confusion-matrix heat map with counts in the cells, readable at a glance."""
    classes = len(matrix)
    figure, axes = plt.subplots(figsize=(6.4, 5.6), layout="constrained")
    # Colour the errors, not the diagonal: on a good model the diagonal would wash them out.
    errors = matrix.astype(float).copy()
    np.fill_diagonal(errors, np.nan)
    image = axes.imshow(errors, cmap="Reds")
    figure.colorbar(image, ax=axes, label="misclassified images")
    for true in range(classes):
        for predicted in range(classes):
            count = int(matrix[true, predicted])
            if count:
                diagonal = true == predicted
                axes.text(
                    predicted,
                    true,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8,
                    fontweight="bold" if diagonal else "normal",
                    color="black" if diagonal or count < np.nanmax(errors) / 2 else "white",
                    # Inside the axes: the layout need not measure them (a quarter of the
                    # render, which every trial pays).
                    in_layout=False,
                )
    names = tuple(class_names) if len(class_names) == classes else tuple(map(str, range(classes)))
    axes.set_xticks(range(classes), names, rotation=90 if max(map(len, names)) > 2 else 0)
    axes.set_yticks(range(classes), names)
    axes.set_xlabel(f"predicted {_kind(names)}")
    axes.set_ylabel(f"true {_kind(names)}")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    axes.set_title(f"{title}\naccuracy {accuracy:.2%} of {matrix.sum():,} images")
    return figure


def mcnemar_exact(only_first_right: int, only_second_right: int) -> float:
    """Two-sided exact McNemar test: the probability, if both models were equally good, of
    a split of the discordant images at least this uneven (a binomial test with p = 1/2)."""
    n = only_first_right + only_second_right
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_first_right, only_second_right) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Two models on the same images: who gets right what the other gets wrong."""

    first: Evaluation
    second: Evaluation
    only_first_right: int
    only_second_right: int

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_first_right, self.only_second_right)


def compare(first_probabilities, second_probabilities, labels, class_names=None) -> Comparison:
    """Compare two models' class probabilities on the same labelled images."""
    first = from_probabilities(first_probabilities, labels, class_names)
    second = from_probabilities(second_probabilities, labels, class_names)
    first_right = first.probabilities.argmax(axis=1) == labels
    second_right = second.probabilities.argmax(axis=1) == labels
    return Comparison(
        first=first,
        second=second,
        only_first_right=int(np.sum(first_right & ~second_right)),
        only_second_right=int(np.sum(second_right & ~first_right)),
    )
