"""The full search space: augmentation, label smoothing, optimizers, learning-rate schedules.

Checked against Keras's own layers and losses as the reference, on real MNIST images.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import optuna
import pytest

from conftest import FIXTURE_DIR
from digitune import backend, data, model, space, study_file, trainer
from digitune.data import mnist

AUGMENTED = {
    "augment_shift": 0.1,
    "augment_rotation_degrees": 10.0,
    "augment_zoom": 0.1,
    "num_filters": 8,
    "dense_units": 16,
}


@pytest.fixture(scope="module")
def split() -> data.Split:
    return data.split(mnist.load_folder(FIXTURE_DIR))


def test_augmentation_changes_training_batches_only(split):
    keras.utils.set_random_seed(0)
    augmented = model.build_model(AUGMENTED)
    plain = model.build_model({k: v for k, v in AUGMENTED.items() if not k.startswith("augment")})
    assert "augmentation" in [layer.name for layer in augmented.layers]
    assert "augmentation" not in [layer.name for layer in plain.layers]
    for layer in plain.layers:
        augmented.get_layer(layer.name).set_weights(layer.get_weights())
    images = split.x_validation[:64]

    # Inference (validation, test, serving): the augmentation is the identity.
    block = augmented.get_layer("augmentation")
    np.testing.assert_array_equal(np.asarray(block(images, training=False)), images)
    np.testing.assert_allclose(
        augmented.predict(images, verbose=0), plain.predict(images, verbose=0), atol=1e-6
    )
    # Training batches: shifted, rotated and zoomed, ink kept on the canvas.
    moved = np.asarray(block(images, training=True))
    assert moved.shape == images.shape
    changed = np.abs(moved - images).reshape(len(images), -1).max(axis=1) > 0.1
    assert changed.mean() > 0.9
    assert moved.min() >= 0.0 and moved.max() <= 1.0 + 1e-6


def test_a_flip_mirrors_about_half_the_training_pictures_and_nothing_else(split):
    """Flipping alone: each training picture comes back as it was or mirrored left to right,
    exactly as NumPy mirrors it, about half of each; at inference, as it was. A network
    saved before flips existed loads without one."""
    keras.utils.set_random_seed(0)
    block = model.augmentation({"augment_flip": True})
    images = split.x_validation[:200]
    out = np.asarray(block(images, training=True))
    same = np.all(np.isclose(out, images, atol=1e-5), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(out, images[:, :, ::-1], atol=1e-5), axis=(1, 2, 3))
    assert np.all(same | mirrored) and 70 < mirrored.sum() < 130
    np.testing.assert_array_equal(np.asarray(block(images, training=False)), images)
    # With shifts too, a mirror still: the picture's ink moves to the other side on average.
    both = model.augmentation({"augment_flip": True, "augment_shift": 0.05})
    config = both.layers[0].get_config()
    assert config["flip"] is True and config["shift"] == 0.05
    config.pop("flip")  # As saved before flips: loads unflipped.
    assert not model.RandomAffine.from_config(config).flip


def test_label_smoothing_matches_keras_categorical_crossentropy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=32)
    probabilities = rng.dirichlet(np.ones(10), size=32).astype("float32")
    ours = model.SparseCrossentropyWithLabelSmoothing(0.1)(labels, probabilities)
    reference = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(
        keras.ops.one_hot(labels, 10), probabilities
    )
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    compiled = model.build_model({"label_smoothing": 0.1})
    assert compiled.loss.label_smoothing == 0.1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adam", keras.optimizers.Adam),
        ("adamw", keras.optimizers.AdamW),
        ("sgd", keras.optimizers.SGD),
        ("rmsprop", keras.optimizers.RMSprop),
    ],
)
def test_optimizer_choice(name, expected):
    built = model.build_model({"optimizer": name, "weight_decay": 0.01, "learning_rate": 0.002})
    assert type(built.optimizer) is expected
    assert float(built.optimizer.learning_rate) == pytest.approx(0.002)
    if name == "adamw":
        assert built.optimizer.weight_decay == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"optimizer": "adagrad"},
            "'optimizer' must be one of adam, adamw, sgd, rmsprop, got 'adagrad'",
        ),
        ({"lr_schedule": "step"}, "lr_schedule"),
    ],
)
def test_unknown_choices_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        model.build_model(params)


class LearningRates(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_cosine_schedule_decays_over_the_epochs(split):
    small = data.Split(
        split.x_train[:128], split.y_train[:128], split.x_validation[:64], split.y_validation[:64]
    )
    params = {"num_filters": 8, "dense_units": 16, "learning_rate": 0.004, "lr_schedule": "cosine"}
    recorder = LearningRates()
    trainer.fit(model.build_model(params), params, small, 4, [recorder])
    expected = [0.004 * 0.5 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(4)]
    assert recorder.rates == pytest.approx(expected, rel=1e-5)


def test_full_study_file_trains_under_the_study_precision(split):
    definition = study_file.load(Path(__file__).parents[1] / "studies" / "full.toml")
    assert {"augment_shift", "label_smoothing", "lr_schedule", "optimizer"} <= set(
        definition.distributions
    )
    trial = optuna.trial.FixedTrial(
        {
            **{name: _middle(d) for name, d in definition.distributions.items()},
            "batch_normalization": True,
            "optimizer": "adamw",
        }
    )
    params = space.suggest(trial, definition)
    keras.mixed_precision.set_global_policy(backend.precision("auto")[0])
    try:
        cnn = model.build_model(params)
        small = data.Split(
            split.x_train[:256],
            split.y_train[:256],
            split.x_validation[:64],
            split.y_validation[:64],
        )
        history = trainer.fit(cnn, params, small, 1).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert math.isfinite(history["loss"][0])
    assert 0.0 <= history["val_accuracy"][0] <= 1.0


def _middle(distribution):
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return distribution.choices[0]
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return distribution.low
    if distribution.log:
        return math.sqrt(distribution.low * distribution.high)
    return (distribution.low + distribution.high) / 2


def test_the_deployed_model_is_the_trained_one_without_augmentation(split):
    augmented = model.build_model(AUGMENTED)
    augmented.fit(split.x_train[:256], split.y_train[:256], batch_size=64, epochs=1, verbose=0)
    deployed = model.for_deployment(augmented, AUGMENTED)
    assert "augmentation" not in [layer.name for layer in deployed.layers]
    assert deployed.count_params() == augmented.count_params()
    np.testing.assert_allclose(
        deployed.predict(split.x_validation, verbose=0),
        augmented.predict(split.x_validation, verbose=0),
        atol=1e-6,
    )
