"""Build a compiled Keras CNN from a plain dict of hyperparameters and the data's shape.

`build_model(params)` is a pure function of plain values: a test, the registry or a refit
can rebuild any trial's model from the params that trial logged. It never sees an Optuna
trial; `digitune.space` turns trials into these dicts. Its building blocks beyond Keras's
own are in `digitune.custom_objects`.
"""

from __future__ import annotations

import math
import numbers

import keras
from keras import layers

from digitune import builder
from digitune.custom_objects import (
    FusedBatchNormalization,
    RandomAffine,
    SparseCrossentropyWithLabelSmoothing,
)

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# What the dataset decides, not the search (MNIST's by default): a study adds its dataset's to
# every trial's params, so that a trial's params alone still rebuild its model.
DATA_PARAMS: dict[str, int] = {
    "image_height": IMAGE_SHAPE[0],
    "image_width": IMAGE_SHAPE[1],
    "image_channels": IMAGE_SHAPE[2],
    "num_classes": NUM_CLASSES,
}

# Every hyperparameter a trial can have, with the tutorial's CNN as the default. A study
# file may sample or fix any of these and nothing else. `batch_size` is read by the
# trainer, not the builder, but belongs to the same set so that a trial's params are whole.
HYPERPARAMETER_DEFAULTS: dict[str, object] = {
    "learning_rate": 1e-3,
    "batch_size": 32,
    "num_conv_blocks": 1,
    "num_filters": 32,
    # Small models for devices: more convolutions per block, filters growing slower than
    # doubling, depthwise-separable convolutions (after the first), and global average
    # pooling instead of flattening, with `dense_units = 0` for no hidden dense layer.
    "convs_per_block": 1,
    "filter_growth": 2.0,
    "separable_convolutions": False,
    "global_average_pooling": False,
    "kernel_size": 3,
    "dense_units": 128,
    "dropout_rate": 0.0,
    "batch_normalization": False,
    # Augmentation of training batches (Keras preprocessing layers, inactive at inference):
    # random shifts as a fraction of the image's size, rotations in degrees, zoom fraction.
    "augment_shift": 0.0,
    "augment_rotation_degrees": 0.0,
    "augment_zoom": 0.0,
    "augment_flip": False,
    # adam, adamw (decoupled weight decay of `weight_decay`), sgd (Nesterov momentum 0.9)
    # or rmsprop. `weight_decay` is AdamW's; the others ignore it.
    "optimizer": "adam",
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    # Read by the trainer, like batch_size: constant, cosine (decay to 0 over the epochs)
    # or plateau (halve when validation accuracy stalls for an epoch).
    "lr_schedule": "constant",
}
# What each hyperparameter does, in words (docs/study-files.md).
HYPERPARAMETER_DOCS: dict[str, str] = {
    "learning_rate": "the optimizer's learning rate",
    "batch_size": "training images per batch (read by the trainer)",
    "num_conv_blocks": "convolution blocks, each ending in 2x2 max pooling",
    "num_filters": "filters of the first block's convolutions",
    "convs_per_block": "convolutions in each block",
    "filter_growth": "factor by which the filters grow from one block to the next",
    "separable_convolutions": "depthwise-separable convolutions after the first",
    "global_average_pooling": "global average pooling instead of flattening",
    "kernel_size": "side of the square convolution kernels",
    "dense_units": "units of the hidden dense layer (0: none)",
    "dropout_rate": "dropout before and after the dense layer",
    "batch_normalization": "batch normalisation after every convolution",
    "augment_shift": "random shifts of training images, as a fraction of their size",
    "augment_rotation_degrees": "random rotations of training images, in degrees",
    "augment_zoom": "random zoom of training images, as a fraction",
    "augment_flip": "mirror training images left to right at random, half of them on average",
    "optimizer": "adam, adamw (decoupled weight decay), sgd (Nesterov momentum 0.9) or rmsprop",
    "weight_decay": "AdamW's weight decay (the others ignore it)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "lr_schedule": "constant, cosine (decay to 0 over the epochs) or plateau (halve when "
    "validation accuracy stalls for an epoch); read by the trainer",
}
AUGMENTATION_PARAMS = ("augment_shift", "augment_rotation_degrees", "augment_zoom", "augment_flip")
# How a network is trained rather than what it is: a network from a builder of the user's own
# (`digitune.builder`) takes these as ours does, beside the builder's own hyperparameters.
TRAINING_HYPERPARAMETERS = (
    "learning_rate",
    "batch_size",
    *AUGMENTATION_PARAMS,
    "optimizer",
    "weight_decay",
    "label_smoothing",
    "lr_schedule",
)
# The param naming a trial's builder ("package.module:function"), from the study file's
# [model] table; absent for digitune's own CNN.
BUILDER_PARAM = "builder"
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "plateau")
# What each hyperparameter may be: its type, a test of its value, and the test in words. A
# study file's fixed values, categorical choices and range ends are checked against these
# before anything trains (`digitune.space`), and so is every model `build_model` builds.
HYPERPARAMETER_LIMITS: dict[str, tuple[type, object, str]] = {
    "learning_rate": (float, lambda value: value > 0, "greater than 0"),
    "batch_size": (int, lambda value: 1 <= value <= 50_000, "from 1 to 50,000"),
    # Four 2x2 poolings take 28x28 down to 1x1; a fifth would leave nothing.
    "num_conv_blocks": (int, lambda value: 1 <= value <= 4, "from 1 to 4"),
    "num_filters": (int, lambda value: 1 <= value <= 1024, "from 1 to 1,024"),
    "convs_per_block": (int, lambda value: 1 <= value <= 4, "from 1 to 4"),
    "filter_growth": (float, lambda value: 1 <= value <= 4, "from 1 to 4"),
    "separable_convolutions": (bool, lambda value: True, ""),
    "global_average_pooling": (bool, lambda value: True, ""),
    "kernel_size": (int, lambda value: 1 <= value <= 28, "from 1 to 28"),
    "dense_units": (int, lambda value: 0 <= value <= 16_384, "from 0 (none) to 16,384"),
    "dropout_rate": (float, lambda value: 0 <= value < 1, "in [0, 1)"),
    "batch_normalization": (bool, lambda value: True, ""),
    "augment_shift": (float, lambda value: 0 <= value < 1, "in [0, 1)"),
    "augment_rotation_degrees": (float, lambda value: 0 <= value <= 180, "from 0 to 180"),
    "augment_zoom": (float, lambda value: 0 <= value < 1, "in [0, 1)"),
    "augment_flip": (bool, lambda value: True, ""),
    "optimizer": (str, lambda value: value in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "weight_decay": (float, lambda value: value >= 0, "0 or more"),
    "label_smoothing": (float, lambda value: 0 <= value < 1, "in [0, 1)"),
    "lr_schedule": (
        str,
        lambda value: value in LR_SCHEDULES,
        f"one of {', '.join(LR_SCHEDULES)}",
    ),
    "image_height": (int, lambda value: 1 <= value <= 4096, "from 1 to 4,096"),
    "image_width": (int, lambda value: 1 <= value <= 4096, "from 1 to 4,096"),
    "image_channels": (int, lambda value: value in (1, 3), "1 or 3"),
    "num_classes": (int, lambda value: 2 <= value <= 10_000, "from 2 to 10,000"),
}
# The choices of a string say all there is to say.
_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: ""}


def is_kind(value: object, kind: type) -> bool:
    """Whether `value` is of the hyperparameter type `kind`: an integer is not a bool, a
    number is finite (NumPy's scalars count as Python's)."""
    if kind is bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real) and math.isfinite(value)
    return isinstance(value, kind)


def hyperparameters(reference: str | None = None) -> tuple[dict, dict]:
    """(defaults, limits) of what a network takes: our CNN's hyperparameters, or for a
    builder's `reference` its own and our training ones; the data's limits with either.
    A ValueError says what is wrong with a builder."""
    if not reference:
        return HYPERPARAMETER_DEFAULTS, HYPERPARAMETER_LIMITS
    custom = builder.load(reference, (*TRAINING_HYPERPARAMETERS, *DATA_PARAMS, BUILDER_PARAM))
    ours = {name: HYPERPARAMETER_DEFAULTS[name] for name in TRAINING_HYPERPARAMETERS}
    limits = {
        name: HYPERPARAMETER_LIMITS[name] for name in (*TRAINING_HYPERPARAMETERS, *DATA_PARAMS)
    }
    return {**ours, **custom.defaults}, {**limits, **custom.limits}


def hyperparameter_problem(name: str, value: object, reference: str | None = None) -> str | None:
    """What is wrong with `value` for `name`, in words ("must be ..., got ..."), or None; of
    the builder `reference`'s hyperparameters where one is given."""
    kind, test, words = hyperparameters(reference)[1][name]
    if is_kind(value, kind) and test(value):
        return None
    kind_words = "" if words.startswith("one of") else _KIND_WORDS[kind]
    expected = " ".join(part for part in (kind_words, words) if part)
    return f"must be {expected}, got {value!r}"


def check_hyperparameter(name: str, value: object, reference: str | None = None) -> None:
    """A ValueError saying what `name` must be, unless `value` is one of its values."""
    problem = hyperparameter_problem(name, value, reference)
    if problem:
        raise ValueError(f"'{name}' {problem}")


# How much of its moving mean and variance batch normalisation keeps at each training batch.
# Keras's default, 0.99, keeps 14% of the initial statistics after an epoch of 195 batches
# (50,000 images at batch 256), so the first epochs' validation accuracy measures a network
# with wrong statistics and the pruner has nothing to rank. At 0.9 the statistics follow
# within an epoch, and the first epoch's validation accuracy ranks the trials.
BATCH_NORM_MOMENTUM = 0.9


def resolve_params(params: dict) -> dict:
    """The defaults (MNIST's shape; a builder's where `params` name one) overlaid with
    `params`; an unknown name is a ValueError."""
    defaults = hyperparameters(params.get(BUILDER_PARAM))[0]
    unknown = sorted(set(params) - set(defaults) - set(DATA_PARAMS) - {BUILDER_PARAM})
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)}; known ones are {', '.join(defaults)}"
        )
    return {**defaults, **DATA_PARAMS, **params}


def image_shape(params: dict) -> tuple[int, int, int]:
    """The input shape (height, width, channels) that `params` build a model for."""
    params = resolve_params(params)
    return tuple(int(params[name]) for name in ("image_height", "image_width", "image_channels"))


def blocks_problem(num_conv_blocks: int, shape: tuple[int, ...]) -> str | None:
    """Why `num_conv_blocks` 2x2 poolings do not fit images of `shape`, or None."""
    side = min(shape[:2])
    if 2**num_conv_blocks <= side:
        return None
    return (
        f"{num_conv_blocks} convolution blocks halve {shape[0]}x{shape[1]} images "
        f"{num_conv_blocks} times, to nothing; at most {side.bit_length() - 1} fit"
    )


def build_model(params: dict) -> keras.Model:
    """A compiled network: ours (`convolutions`), or the network of the builder `params`
    name (`digitune.builder`), behind the augmentation of training batches."""
    params = resolve_params(params)
    reference = params.get(BUILDER_PARAM)
    for name, value in params.items():
        if name != BUILDER_PARAM:
            check_hyperparameter(name, value, reference)
    if not reference:
        problem = blocks_problem(int(params["num_conv_blocks"]), image_shape(params))
        if problem:
            raise ValueError(problem)

    inputs = keras.Input(shape=image_shape(params), name="image")
    augment = augmentation(params)
    features = augment(inputs) if augment.layers else inputs
    if reference:
        shape, classes = image_shape(params), int(params["num_classes"])
        network = builder.network(builder.load(reference), params, shape, classes)
        # Probabilities in float32 under a mixed-precision policy, as our softmax gives them.
        outputs = layers.Activation("linear", dtype="float32", name="probabilities")(
            network(features)
        )
        model = keras.Model(inputs, outputs, name=network.name)
    else:
        model = keras.Model(inputs, convolutions(features, params), name="mnist_cnn")
    label_smoothing = float(params["label_smoothing"])
    model.compile(
        optimizer=_optimizer(params),
        loss=SparseCrossentropyWithLabelSmoothing(label_smoothing)
        if label_smoothing
        else "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def convolutions(features, params: dict):
    """Our CNN, from the (augmented) input `features` to its probabilities:
    `num_conv_blocks` blocks of `convs_per_block` convolutions (filters growing by
    `filter_growth` a block from `num_filters`), optional batch normalisation and 2x2 max
    pooling, then flattening (or global average pooling), dropout, a dense layer of
    `dense_units` (none for 0), dropout again and a softmax over the classes."""
    for block, filters in enumerate(block_filters(params), start=1):
        for index in range(int(params["convs_per_block"])):
            suffix = f"{block}" if index == 0 else f"{block}_{index + 1}"
            # A depthwise convolution of the one- or three-channel input saves nothing.
            separable = params["separable_convolutions"] and (block, index) != (1, 0)
            convolution = layers.SeparableConv2D if separable else layers.Conv2D
            features = convolution(
                filters,
                int(params["kernel_size"]),
                padding="same",
                activation="relu",
                name=f"conv_{suffix}",
            )(features)
            if params["batch_normalization"]:
                features = FusedBatchNormalization(
                    momentum=BATCH_NORM_MOMENTUM, name=f"batch_norm_{suffix}"
                )(features)
        features = layers.MaxPooling2D(2, name=f"pool_{block}")(features)
    if params["global_average_pooling"]:
        features = layers.GlobalAveragePooling2D(name="global_average_pooling")(features)
    else:
        features = layers.Flatten(name="flatten")(features)
    features = layers.Dropout(float(params["dropout_rate"]), name="dropout_1")(features)
    if int(params["dense_units"]):
        features = layers.Dense(int(params["dense_units"]), activation="relu", name="dense")(
            features
        )
        features = layers.Dropout(float(params["dropout_rate"]), name="dropout_2")(features)
    # Softmax in float32 keeps probabilities exact under a mixed-precision policy.
    outputs = layers.Dense(
        int(params["num_classes"]), activation="softmax", dtype="float32", name="digit"
    )(features)
    return outputs


def for_deployment(trained: keras.Model, params: dict) -> keras.Model:
    """`trained` without its augmentation: the same network built from `params` with every
    augment_* off, holding the trained layers' weights. Augmentation is the identity at
    inference, but its random ops stay in an exported graph, and TFLite cannot convert them.
    Built in the current dtype policy."""
    off = {name: HYPERPARAMETER_DEFAULTS[name] for name in AUGMENTATION_PARAMS}  # 0 or False
    plain = {**resolve_params(params), **off}
    deployed = build_model(plain)
    if plain.get(BUILDER_PARAM):
        # A builder's network is one layer of each, before the float32 probabilities; its
        # name is Keras's count of networks built, different in each.
        deployed.layers[-2].set_weights(trained.layers[-2].get_weights())
        return deployed
    for layer in deployed.layers:
        if layer.weights:
            layer.set_weights(trained.get_layer(layer.name).get_weights())
    return deployed


def from_weights(params: dict, weights) -> keras.Model:
    """The model `params` build, in float32 and without augmentation layers, holding the
    weights of a file that a trial saved, on whichever backend it trained."""
    # The registered model computes in float32 whatever precision the trials trained in: it
    # must run anywhere, and it is what the test accuracy is measured on.
    keras.mixed_precision.set_global_policy("float32")
    cnn = build_model(params)
    # The weights file holds the optimizer's state too; building the optimizer first lets it
    # load whole instead of warning that half the file was skipped.
    cnn.optimizer.build(cnn.trainable_variables)
    cnn.load_weights(weights)
    # Registered, exported and served without the augmentation that only training uses.
    return for_deployment(cnn, params)


def block_filters(params: dict) -> list[int]:
    """The filters of each convolution block: `num_filters`, growing by `filter_growth`."""
    params = resolve_params(params)
    growth, first = float(params["filter_growth"]), int(params["num_filters"])
    return [max(1, round(first * growth**block)) for block in range(int(params["num_conv_blocks"]))]


def augmentation(params: dict) -> keras.Sequential:
    """Random shifts, rotations, zoom and mirroring of training batches; the identity at
    inference, so validation and test images are never changed. Empty when every factor is
    0."""
    params = resolve_params(params)
    factors = {name: float(params[name]) for name in AUGMENTATION_PARAMS}
    if not any(factors.values()):
        return keras.Sequential([], name="augmentation")
    # float32 whatever the precision policy: the image transform is not a bfloat16 kernel.
    return keras.Sequential(
        [
            RandomAffine(
                factors["augment_shift"],
                factors["augment_rotation_degrees"],
                factors["augment_zoom"],
                flip=bool(params["augment_flip"]),
                dtype="float32",
                name="random_affine",
            )
        ],
        name="augmentation",
    )


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
