"""The Keras layer and loss that digitune's models use beyond Keras's own.

Both are registered with Keras under the package name "digitune", so a saved model that holds
them loads wherever digitune is installed; `digitune.model` builds with them.
"""

from __future__ import annotations

import keras
from keras import layers


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


@keras.saving.register_keras_serializable(package="digitune")
class SparseCrossentropyWithLabelSmoothing(keras.losses.Loss):
    """Cross-entropy on integer labels with label smoothing, which Keras's sparse loss lacks."""

    def __init__(self, label_smoothing: float = 0.0, name="sparse_crossentropy_smoothed", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        labels = keras.ops.one_hot(
            keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), y_pred.shape[-1]
        )
        return keras.losses.categorical_crossentropy(
            labels, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
