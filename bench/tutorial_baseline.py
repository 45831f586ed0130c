"""The tutorial's way of training, kept as the baseline of `make bench`.

The classic MNIST tutorial: a CNN (Conv2D 32 3x3, MaxPool 2, Dense 128, Dense 10) trained with
a plain `model.fit` on NumPy arrays, in float32. The only change is `padding="same"`, so that
the network is exactly the one `digitune.model.build_model({})` builds and the comparison is of
trainers, not architectures. Run alone for one epoch's throughput:

    .venv/bin/python bench/tutorial_baseline.py --batch-size 32
"""

import argparse
import time

import keras
from keras import layers


def tutorial_model() -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def study_network_model() -> keras.Model:
    """The default study's 3-block network (32-64-128 filters, batch normalisation, dense 128,
    dropout 0.2), written with Keras's own layers as a tutorial would: what
    `digitune.model.build_model` builds for those params, with Keras's BatchNormalization."""
    blocks = []
    for filters in (32, 64, 128):
        blocks += [
            layers.Conv2D(filters, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(2),
        ]
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            *blocks,
            layers.Flatten(),
            layers.Dropout(0.2),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def fit(
    x_train, y_train, batch_size: int, epochs: int, validation_data=None, callbacks=(),
    network=tutorial_model,
):  # fmt: skip
    """Train the tutorial's model (or `network()`) the tutorial's way, validating after each
    epoch as it does; returns the trained model."""
    keras.mixed_precision.set_global_policy("float32")
    model = network()
    model.fit(
        x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=0,
        validation_data=validation_data, callbacks=list(callbacks),
    )  # fmt: skip
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    x_train = (x_train.astype("float32") / 255)[..., None]
    x_test = (x_test.astype("float32") / 255)[..., None]
    started = time.perf_counter()
    fit(x_train, y_train, args.batch_size, epochs=1, validation_data=(x_test, y_test))
    print(f"{len(x_train) / (time.perf_counter() - started):,.0f} images/s (first epoch)")
