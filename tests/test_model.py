"""The model builder: a pure function of plain params, checked against hand-counted sizes."""

from __future__ import annotations

import numpy as np
import pytest

from digitune import model

# Backend-neutral: these tests run in the JAX pass too (`make test`).
pytestmark = pytest.mark.jax


def conv_params(kernel, channels_in, filters):
    return kernel * kernel * channels_in * filters + filters


def dense_params(units_in, units_out):
    return units_in * units_out + units_out


def test_tutorial_cnn_parameter_count():
    cnn = model.build_model({})  # The defaults are the tutorial's CNN (with 'same' padding).
    expected = conv_params(3, 1, 32) + dense_params(14 * 14 * 32, 128) + dense_params(128, 10)
    assert cnn.count_params() == expected


def test_two_blocks_with_batch_norm_parameter_count():
    params = {
        "num_conv_blocks": 2,
        "num_filters": 16,
        "kernel_size": 5,
        "dense_units": 64,
        "batch_normalization": True,
    }
    cnn = model.build_model(params)
    expected = (
        conv_params(5, 1, 16)
        + 4 * 16  # batch norm: gamma, beta, mean, variance
        + conv_params(5, 16, 32)
        + 4 * 32
        + dense_params(7 * 7 * 32, 64)
        + dense_params(64, 10)
    )
    assert cnn.count_params() == expected


def test_output_is_a_probability_per_digit():
    cnn = model.build_model({"num_conv_blocks": 3, "num_filters": 8, "dense_units": 16})
    probabilities = np.asarray(cnn(np.random.default_rng(0).random((4, 28, 28, 1), "float32")))
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_same_params_build_the_same_architecture():
    params = {"num_conv_blocks": 2, "num_filters": 8, "dropout_rate": 0.3, "learning_rate": 0.01}
    first, second = model.build_model(params), model.build_model(params)
    assert first.get_config() == second.get_config()
    assert float(first.optimizer.learning_rate) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"nf": 3}, "unknown hyperparameter"),
        ({"num_conv_blocks": 5}, "'num_conv_blocks' must be an integer from 1 to 4, got 5"),
        ({"kernel_size": 4.5}, "'kernel_size' must be an integer from 1 to 28, got 4.5"),
        ({"batch_normalization": 1}, "'batch_normalization' must be true or false, got 1"),
        ({"dropout_rate": 1.0}, r"'dropout_rate' must be a number in \[0, 1\), got 1.0"),
    ],
)
def test_bad_params_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        model.build_model(params)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_fused_batch_normalization_computes_what_keras_batch_normalization_does(dtype):
    """The fused layer against Keras's own, the trusted reference: same outputs, same
    moving averages and same gradients, in training and in inference, in every precision a
    study trains in (float16 on GPUs without bfloat16)."""
    import keras

    tf = pytest.importorskip("tensorflow", reason="the fused kernel is TensorFlow's")
    tolerance = {"float32": 1e-4, "mixed_bfloat16": 3e-2, "mixed_float16": 1e-2}[dtype]
    images = np.random.default_rng(0).normal(3.0, 2.0, (16, 7, 7, 5)).astype("float32")
    reference = keras.layers.BatchNormalization(momentum=0.9, dtype=dtype)
    fused = model.FusedBatchNormalization(momentum=0.9, dtype=dtype)
    for layer in (reference, fused):
        layer.build(images.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))

    def train_step(layer):
        batch = tf.constant(images)
        with tf.GradientTape() as tape:
            tape.watch(batch)
            outputs = layer(batch, training=True)
            loss = tf.reduce_sum(tf.cast(outputs, "float32") ** 3)
        return outputs, tape.gradient(loss, [batch, layer.gamma, layer.beta])

    for _ in range(3):
        (expected, expected_grads), (actual, actual_grads) = (
            train_step(reference),
            train_step(fused),
        )
        np.testing.assert_allclose(np.float32(actual), np.float32(expected), atol=tolerance)
        for got, want in zip(actual_grads, expected_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * 10)
    assert abs(float(fused.moving_mean[0])) > 0.5  # the averages moved towards the mean, 3
    np.testing.assert_allclose(fused.moving_mean, reference.moving_mean, rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance, reference.moving_variance, rtol=1e-5)
    np.testing.assert_allclose(
        np.float32(fused(images, training=False)),
        np.float32(reference(images, training=False)),
        atol=tolerance * 10,
    )


def test_a_saved_network_with_batch_normalization_loads_with_its_statistics(tmp_path):
    import keras

    cnn = model.build_model({"num_conv_blocks": 2, "num_filters": 8, "batch_normalization": True})
    images = np.random.default_rng(1).random((32, 28, 28, 1), "float32")
    cnn.fit(images, np.arange(32) % 10, epochs=1, verbose=0)
    cnn.save(tmp_path / "cnn.keras")
    loaded = keras.models.load_model(tmp_path / "cnn.keras")
    assert isinstance(loaded.get_layer("batch_norm_1"), model.FusedBatchNormalization)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), cnn.predict(images, verbose=0))


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_every_precision_trains_and_answers_float32_probabilities(dtype):
    import keras

    keras.mixed_precision.set_global_policy(dtype)
    try:
        params = {"num_conv_blocks": 2, "num_filters": 8, "batch_normalization": True}
        cnn = model.build_model(params)
        images = np.random.default_rng(2).random((64, 28, 28, 1), "float32")
        history = cnn.fit(images, np.arange(64) % 10, epochs=2, verbose=0).history
        assert all(np.isfinite(history["loss"]))
        assert cnn.get_layer("conv_1").compute_dtype == dtype.removeprefix("mixed_")
        probabilities = cnn.predict(images, verbose=0)
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_augmentation_keeps_the_model_compilable_by_xla():
    # Keras's RandomTranslation, RandomRotation and RandomZoom switch XLA off for the whole
    # model (on JAX that trains many times slower); the study's augmentation does not.
    cnn = model.build_model({"augment_shift": 0.1, "augment_rotation_degrees": 10.0})
    layers = [*cnn.layers, *cnn.get_layer("augmentation").layers]
    assert "random_affine" in [layer.name for layer in layers]
    assert all(layer.supports_jit for layer in layers)
