"""What digitune's networks hold beyond Keras's own: a batch normalisation computed by
TensorFlow's fused kernel, a cross-entropy with label smoothing on integer labels, and one
random affine transform for augmentation.

Each is registered with Keras under the package name "digitune" (`digitune>RandomAffine`),
so that a saved model holding them loads, in safe mode, wherever digitune is installed.
"""

from __future__ import annotations

import math

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="digitune")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras's BatchNormalization, computed by TensorFlow's fused kernel.

    Keras 3 normalises with separate reductions and element-wise ops, upcast to float32; on
    a CPU that makes batch normalisation cost more than the convolutions, and TensorFlow's
    fused kernel computes the same function, moving averages included, several times faster
    (docs/benchmarks.md). Other backends, masks and other axes take Keras's own path. The
    weights are Keras's, so a model saved with this layer has exactly BatchNormalization's
    variables.
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
            inputs
            if inputs.dtype in (tf.float32, tf.bfloat16, tf.float16)
            else tf.cast(inputs, "float32")
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
                features,
                gamma,
                beta,
                epsilon=self.epsilon,
                is_training=False,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
            )
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


@keras.saving.register_keras_serializable(package="digitune")
class RandomAffine(layers.Layer):
    """Each training image shifted (by up to `shift` of its size), rotated (up to
    `rotation_degrees`), zoomed (up to `zoom`) and, with `flip`, mirrored left to right
    (half of them, on average) at random, in one affine transform with zeros filling
    in; the identity at inference.

    Keras's RandomTranslation, RandomRotation and RandomZoom do the same three steps, but
    switch XLA compilation off for the whole model on JAX, which then trains many times
    slower; this layer draws from a seed generator and calls `keras.ops.image`, which every
    backend compiles."""

    def __init__(self, shift=0.0, rotation_degrees=0.0, zoom=0.0, seed=None, flip=False, **kwargs):
        super().__init__(**kwargs)
        self.shift, self.rotation_degrees, self.zoom = shift, rotation_degrees, zoom
        self.flip = bool(flip)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        count = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]

        def uniform(bound: float):
            return keras.random.uniform((count,), -bound, bound, seed=self.seed_generator)

        angle = uniform(math.radians(self.rotation_degrees))
        scale = 1.0 + uniform(self.zoom)
        shift_x, shift_y = uniform(self.shift) * width, uniform(self.shift) * height
        # The transform maps each output pixel back to where it comes from: about the
        # centre, undo the shift, then the rotation and the zoom.
        cos, sin = ops.cos(angle) / scale, ops.sin(angle) / scale
        centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
        from_x = centre_x - (cos * (centre_x + shift_x) + sin * (centre_y + shift_y))
        from_y = centre_y - (-sin * (centre_x + shift_x) + cos * (centre_y + shift_y))
        zeros = ops.zeros_like(cos)
        row_x = [cos, sin, from_x]
        if self.flip:  # Mirror the source column about the centre, x -> 2 centre - x.
            mirror = ops.sign(keras.random.uniform((count,), -1, 1, seed=self.seed_generator))
            row_x = [cos * mirror, sin * mirror, from_x * mirror + (1 - mirror) * centre_x]
        transform = ops.stack([*row_x, -sin, cos, from_y, zeros, zeros], axis=1)
        return ops.image.affine_transform(
            images, transform, interpolation="bilinear", fill_mode="constant"
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {"shift": self.shift, "rotation_degrees": self.rotation_degrees}
        config |= {"zoom": self.zoom, "seed": self.seed, "flip": self.flip}
        return {**super().get_config(), **config}
