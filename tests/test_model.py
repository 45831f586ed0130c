"""The model builder: a pure function of plain params, checked against hand-counted sizes."""

from __future__ import annotations

import numpy as np
import pytest

from digitune import model


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
        ({"num_conv_blocks": 5}, "num_conv_blocks must be 1 to 4"),
        ({"dropout_rate": 1.0}, "dropout_rate must be in"),
    ],
)
def test_bad_params_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        model.build_model(params)
