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
    # Augmentation of training batches (Keras preprocessing layers, inactive at inference):
    # random shifts as a fraction of the image's size, rotations in degrees, zoom fraction.
    "augment_shift": 0.0,
    "augment_rotation_degrees": 0.0,
    "augment_zoom": 0.0,
    # adam, adamw (decoupled weight decay of `weight_decay`), sgd (Nesterov momentum 0.9)
    # or rmsprop. `weight_decay` is AdamW's; the others ignore it.
    "optimizer": "adam",
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    # Read by the trainer, like batch_size: constant, cosine (decay to 0 over the epochs)
    # or plateau (halve when validation accuracy stalls for an epoch).
    "lr_schedule": "constant",
}
# How much of its moving mean and variance batch normalisation keeps at each training batch.
# Keras's default, 0.99, keeps 14% of the initial statistics after an epoch of 195 batches
# (50,000 images at batch 256), so the first epochs' validation accuracy measured a network
# with wrong statistics (0.11 and 0.19 after epoch 1, 0.98 after epoch 3, in the default
# study on 2026-11-26) and pruning had to wait. At 0.9 the statistics follow within an
# epoch and the first epoch's validation accuracy ranks the trials.
BATCH_NORM_MOMENTUM = 0.9
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "plateau")


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
    if params["optimizer"] not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {params['optimizer']!r}"
        )
    if params["lr_schedule"] not in LR_SCHEDULES:
        raise ValueError(
            f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {params['lr_schedule']!r}"
        )

    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    augment = augmentation(params)
    features = augment(inputs) if augment.layers else inputs
    for block in range(int(params["num_conv_blocks"])):
        features = layers.Conv2D(
            int(params["num_filters"]) * 2**block,
            int(params["kernel_size"]),
            padding="same",
            activation="relu",
            name=f"conv_{block + 1}",
        )(features)
        if params["batch_normalization"]:
            features = FusedBatchNormalization(
                momentum=BATCH_NORM_MOMENTUM, name=f"batch_norm_{block + 1}"
            )(features)
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
    label_smoothing = float(params["label_smoothing"])
    model.compile(
        optimizer=_optimizer(params),
        loss=SparseCrossentropyWithLabelSmoothing(label_smoothing)
        if label_smoothing
        else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def augmentation(params: dict) -> keras.Sequential:
    """Random shifts, rotations and zoom of training batches; the identity at inference, so
    validation and test images are never changed. Empty when every factor is 0."""
    params = resolve_params(params)
    shift = float(params["augment_shift"])
    rotation = float(params["augment_rotation_degrees"])
    zoom = float(params["augment_zoom"])
    steps = []
    # float32 whatever the precision policy: the image transforms are not bfloat16 kernels.
    if shift:
        steps.append(layers.RandomTranslation(shift, shift, fill_mode="constant", dtype="float32"))
    if rotation:
        steps.append(layers.RandomRotation(rotation / 360, fill_mode="constant", dtype="float32"))
    if zoom:
        steps.append(layers.RandomZoom(zoom, zoom, fill_mode="constant", dtype="float32"))
    return keras.Sequential(steps, name="augmentation")


@keras.saving.register_keras_serializable(package="digitune")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization, computed by TensorFlow's fused kernel.

    Keras 3 normalises with separate reductions and element-wise ops, upcast to float32; on
    a 2-core CPU that made batch normalisation cost more than the convolutions (the default
    study's 32-64-128 network trained at 1,214 images/s with it and 4,349 without it, in
    bfloat16). TensorFlow's fused kernel computes the same function, including the moving
    averages, at 4,876 images/s (a median of 3; Xeon with AMX, 2026-11-26). Other backends,
    masks and other axes take Keras's own path. The weights are Keras's, so a model saved
    with this layer has exactly BatchNormalization's variables.
    """

    def call(self, inputs, training=None, mask=None):
        if (
            keras.backend.backend() != "tensorflow"
            or mask is not None
            or len(inputs.shape) != 4
            or self.axis not in (-1, 3, [3])
        ):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        gamma, beta = tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32)
        features = (
            inputs if inputs.dtype in (tf.float32, tf.bfloat16) else tf.cast(inputs, "float32")
        )
        if training and self.trainable:
            outputs, batch_mean, batch_variance = tf.compat.v1.nn.fused_batch_norm(
                features, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            # The kernel returns the variance corrected by n / (n - 1); Keras averages the
            # uncorrected one, and so does this layer.
            count = tf.cast(tf.size(features) // tf.shape(features)[-1], tf.float32)
            batch_variance *= (count - 1.0) / count
            for average, value in (
                (self.moving_mean, batch_mean),
                (self.moving_variance, batch_variance),
            ):
                average.assign(average * self.momentum + value * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                features, gamma, beta, epsilon=self.epsilon, is_training=False,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
            )  # fmt: skip
        return tf.cast(outputs, self.compute_dtype)


def _optimizer(params: dict) -> keras.optimizers.Optimizer:
    learning_rate = float(params["learning_rate"])
    name = params["optimizer"]
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=float(params["weight_decay"]))
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    return keras.optimizers.Adam(learning_rate)


@keras.saving.register_keras_serializable(package="digitune")
class SparseCrossentropyWithLabelSmoothing(keras.losses.Loss):
    """Cross-entropy on integer labels with label smoothing, which Keras's sparse loss lacks."""

    def __init__(self, label_smoothing: float = 0.0, name="sparse_crossentropy_smoothed", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), NUM_CLASSES
        )
        return keras.losses.categorical_crossentropy(
            labels, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
