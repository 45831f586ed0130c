"""Build a compiled Keras CNN for MNIST from a plain dict of hyperparameters.

`build_model(params)` is a pure function of plain values: a test, the registry or a refit
can rebuild any trial's model from the params that trial logged. It never sees an Optuna
trial; `digitune.space` turns trials into these dicts.
"""

from __future__ import annotations

import keras
from keras import layers

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

# Every hyperparameter a trial can have, with the tutorial's CNN as the default. A study
# file may sample or fix any of these and nothing else. `batch_size` is read by the
# trainer, not the builder, but belongs to the same set so that a trial's params are whole.
HYPERPARAMETER_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-3,
    "batch_size": 32,
    "num_conv_blocks": 1,
    "num_filters": 32,
    "kernel_size": 3,
    "dense_units": 128,
    "dropout_rate": 0.0,
    "batch_normalization": False,
}


def resolve_params(params: dict) -> dict:
    """The defaults overlaid with `params`; an unknown name is a ValueError."""
    unknown = sorted(set(params) - set(HYPERPARAMETER_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)}; "
            f"known ones are {', '.join(HYPERPARAMETER_DEFAULTS)}"
        )
    return {**HYPERPARAMETER_DEFAULTS, **params}


def build_model(params: dict) -> keras.Model:
    """A compiled CNN: `num_conv_blocks` blocks of Conv2D (filters doubling from
    `num_filters`), optional batch normalisation and 2x2 max pooling, then dropout, a dense
    layer of `dense_units`, dropout again and a softmax over the ten digits."""
    params = resolve_params(params)
    if not 1 <= int(params["num_conv_blocks"]) <= 4:
        # Four 2x2 poolings take 28x28 down to 1x1; a fifth would leave nothing.
        raise ValueError(f"num_conv_blocks must be 1 to 4, got {params['num_conv_blocks']}")
    if not 0.0 <= float(params["dropout_rate"]) < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {params['dropout_rate']}")

    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    features = inputs
    for block in range(int(params["num_conv_blocks"])):
        features = layers.Conv2D(
            int(params["num_filters"]) * 2**block,
            int(params["kernel_size"]),
            padding="same",
            activation="relu",
            name=f"conv_{block + 1}",
        )(features)
        if params["batch_normalization"]:
            features = layers.BatchNormalization(name=f"batch_norm_{block + 1}")(features)
        features = layers.MaxPooling2D(2, name=f"pool_{block + 1}")(features)
    features = layers.Flatten(name="flatten")(features)
    features = layers.Dropout(float(params["dropout_rate"]), name="dropout_1")(features)
    features = layers.Dense(int(params["dense_units"]), activation="relu", name="dense")(features)
    features = layers.Dropout(float(params["dropout_rate"]), name="dropout_2")(features)
    # Softmax in float32 keeps probabilities exact under a mixed-precision policy.
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="digit")(
        features
    )

    model = keras.Model(inputs, outputs, name="mnist_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(params["learning_rate"])),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
