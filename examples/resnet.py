"""A small ResNet, as a network of your own that digitune tunes like its CNN.

    make tune STUDY=examples/resnet.toml

`build` is a builder (`[model] builder = "examples.resnet:build"`): a pure function from a
trial's params, the pictures' shape and the number of classes to an uncompiled Keras model.
The network is He et al.'s residual network sized for small pictures: a 3x3 stem, then
`num_stages` stages of `blocks_per_stage` residual blocks, each stage after the first
halving the picture and doubling the filters, then global average pooling, dropout and a
softmax. `build.hyperparameters` declares what [space] may sample, with defaults and limits;
digitune adds its own training hyperparameters (learning rate, batch size, augmentation...).

The residual block is a layer of this module's own, registered with Keras: a registered
version holds its configuration, not its code, and loads in Keras's safe mode wherever this
module can be imported (the project folder, or an installed package).
"""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="digitune_examples")
class ResidualBlock(layers.Layer):
    """Two 3x3 convolutions with batch normalisation, added to the block's input (through a
    1x1 convolution where the block changes the picture's size or the filters)."""

    def __init__(self, filters: int, strides: int = 1, projection: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides, self.projection = filters, strides, projection
        self.convolution_1 = layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False
        )
        self.normalization_1 = layers.BatchNormalization()
        self.convolution_2 = layers.Conv2D(filters, 3, padding="same", use_bias=False)
        self.normalization_2 = layers.BatchNormalization()
        self.shortcut = (
            layers.Conv2D(filters, 1, strides=strides, use_bias=False) if projection else None
        )

    def build(self, input_shape):
        self.convolution_1.build(input_shape)
        inner = self.convolution_1.compute_output_shape(input_shape)
        self.normalization_1.build(inner)
        self.convolution_2.build(inner)
        self.normalization_2.build(inner)
        if self.shortcut is not None:
            self.shortcut.build(input_shape)

    def call(self, inputs, training=None):
        features = self.normalization_1(self.convolution_1(inputs), training=training)
        features = self.normalization_2(
            self.convolution_2(keras.ops.relu(features)), training=training
        )
        shortcut = inputs if self.shortcut is None else self.shortcut(inputs)
        return keras.ops.relu(features + shortcut)

    def compute_output_shape(self, input_shape):
        return self.convolution_1.compute_output_shape(input_shape)[:-1] + (self.filters,)

    def get_config(self):
        config = {"filters": self.filters, "strides": self.strides, "projection": self.projection}
        return {**super().get_config(), **config}


def build(params: dict, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The ResNet that `params` describe, for pictures of `input_shape`."""
    stages = int(params["num_stages"])
    if 2 ** (stages - 1) > min(input_shape[:2]):
        raise ValueError(
            f"{stages} stages halve {input_shape[0]}x{input_shape[1]} pictures "
            f"{stages - 1} times, to nothing"
        )
    filters = int(params["num_filters"])
    inputs = keras.Input(shape=input_shape)
    features = layers.Conv2D(filters, 3, padding="same", use_bias=False, name="stem")(inputs)
    features = layers.Activation("relu")(layers.BatchNormalization()(features))
    for stage in range(stages):
        for block in range(int(params["blocks_per_stage"])):
            downsample = stage > 0 and block == 0
            features = ResidualBlock(
                filters * 2**stage,
                strides=2 if downsample else 1,
                projection=downsample,
                name=f"stage_{stage + 1}_block_{block + 1}",
            )(features)
    features = layers.GlobalAveragePooling2D()(features)
    features = layers.Dropout(float(params["dropout_rate"]))(features)
    # The softmax in float32, as Keras's mixed-precision guide asks of a model's output.
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32")(features)
    return keras.Model(inputs, outputs, name="resnet")


build.hyperparameters = {
    "num_stages": {"default": 2, "low": 1, "high": 4},
    "blocks_per_stage": {"default": 1, "low": 1, "high": 4},
    "num_filters": {"default": 16, "low": 4, "high": 256},
    "dropout_rate": {"default": 0.0, "low": 0.0, "high": 0.9},
}
