"""The trainer's verdict on a finished training: blown up (FAIL with a reason) or merely slow."""

from __future__ import annotations

import numpy as np
import pytest

from digitune import backend, config, data, model, trainer
from digitune.data import mnist

# Backend-neutral: these tests run in the JAX pass too (`make test`).
pytestmark = pytest.mark.jax

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
    with pytest.raises(trainer.DivergedError, match="collapsed to predicting class 1 for 100%"):
        trainer.check_learned({"loss": losses}, PARAMS, ONE_CLASS)


@pytest.mark.parametrize(
    ("losses", "matrix", "twin_losses", "twin_matrix"),
    [
        # slow: one class so far, but the loss falls; its twin's loss stays put
        ([2.303, 2.301], ONE_CLASS, [2.303, 2.303], ONE_CLASS),
        # one epoch, no worse than a guess; its twin's is far above one
        ([2.30], ONE_CLASS, [23.0], ONE_CLASS),
        # the loss rose, but the network tells digits apart; its twin predicts one digit
        ([0.5, 0.6, 0.7], VARIED, [0.5, 0.6, 0.7], ONE_CLASS),
        ([20.0, 25.0], VARIED, [20.0, 25.0], ONE_CLASS),
    ],
)
def test_a_slow_or_working_network_is_left_to_the_pruner(losses, matrix, twin_losses, twin_matrix):
    """The verdict draws the line where it says: each slow or working network passes, and
    its twin, one change away (the loss does not fall, or one digit predicted), fails."""
    verdicts = []
    for history, confusion in ((losses, matrix), (twin_losses, twin_matrix)):
        try:
            trainer.check_learned({"loss": history}, PARAMS, confusion)
            verdicts.append("left to the pruner")
        except trainer.DivergedError:
            verdicts.append("diverged")
    assert verdicts == ["left to the pruner", "diverged"]


@pytest.mark.parametrize("name", ["tensorflow", "jax"])
def test_endless_batches_cover_each_pass_once_in_a_new_order(name):
    # tf.data on TensorFlow, a NumPy generator on other backends: the same batches either way.
    import keras

    if name == "tensorflow":
        pytest.importorskip("tensorflow")
    keras.utils.set_random_seed(0)
    images = np.arange(10, dtype="float32").reshape(10, 1, 1, 1)
    labels = np.arange(10)
    stream = iter(trainer.endless_batches(images, labels, 5, name))
    batches = [tuple(np.asarray(part) for part in next(stream)) for _ in range(4)]
    assert [len(batch_labels) for _, batch_labels in batches] == [5, 5, 5, 5]
    first = np.concatenate([batch_labels for _, batch_labels in batches[:2]])
    second = np.concatenate([batch_labels for _, batch_labels in batches[2:]])
    assert sorted(first) == sorted(second) == list(range(10))
    assert list(first) != list(second)  # reshuffled for the second pass
    for batch_images, batch_labels in batches:  # images stay with their labels
        assert batch_images.ravel().tolist() == batch_labels.tolist()


def test_an_epoch_of_epoch_images_trains_that_many_images(fixture_dir):
    import keras

    split = data.split(mnist.load_folder(fixture_dir))  # 1,500 training images
    steps = []

    class LastBatch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            steps.append(self.last)

        def on_train_batch_end(self, batch, logs=None):
            self.last = batch

    params = {"batch_size": 64, "dense_units": 16, "num_filters": 8}
    settings = config.TrainingSettings(epoch_images=600, steps_per_execution=4)
    history = trainer.fit(model.build_model(params), params, split, 3, [LastBatch()], 0, settings)
    # 600 images are 9 batches of 64, rounded down to whole calls of 4 batches: 8 batches.
    assert steps == [7, 7, 7]
    assert len(history.history["val_accuracy"]) == 3
    whole = trainer.fit(model.build_model(params), params, split, 1, [LastBatch()])
    assert steps[-1] == 23 and len(whole.history["loss"]) == 1  # 1,500 / 64: 24 batches


def test_tensorflow_s_retracing_hints_are_dropped_and_its_other_warnings_kept(caplog):
    import logging

    pytest.importorskip("tensorflow")
    backend.load("tensorflow")
    tensorflow_log = logging.getLogger("tensorflow")
    with caplog.at_level(logging.WARNING):
        tensorflow_log.warning(
            "5 out of the last 5 calls to <function f> triggered tf.function retracing."
        )
        tensorflow_log.warning("Gradients do not exist for variables")
    assert [record.getMessage() for record in caplog.records] == [
        "Gradients do not exist for variables"
    ]
