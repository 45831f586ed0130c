"""Your own network, tuned like ours: a study file's `[model] builder = "package.module:function"`.

A builder is a pure function from a trial's params, the pictures' shape and the number of
classes to an uncompiled Keras model ending in a softmax over the classes. It declares its
own hyperparameters, each with a default and its limits, as its `hyperparameters` attribute:

    def build(params: dict, input_shape: tuple, num_classes: int) -> keras.Model: ...

    build.hyperparameters = {
        "num_stages": {"default": 2, "low": 1, "high": 4},
        "dropout_rate": {"default": 0.0, "low": 0.0, "high": 0.9},
        "activation": {"default": "relu", "choices": ["relu", "gelu"]},
        "pre_activation": {"default": True},
    }

[space] samples or fixes those names and digitune's training hyperparameters
(`model.TRAINING_HYPERPARAMETERS`: learning rate, batch size, optimizer, augmentation, ...),
each checked against its limits before anything trains. digitune puts the augmentation in
front of the builder's network, compiles and trains it, and tracks, registers and serves it
as it does its own CNN (`model.build_model`). The module is imported from the project folder
(or wherever Python finds it); custom layers in it register with
`keras.saving.register_keras_serializable`, and loading a registered version imports the
module again (`loader.load`), so that the version loads in Keras's safe mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import keras

from digitune import config

# "package.module:function", as a study file names a builder and a version's tag keeps it.
REFERENCE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_DECLARATION_KEYS = {"default", "low", "high", "choices"}


@dataclasses.dataclass(frozen=True)
class Builder:
    """An imported builder: its function, and its hyperparameters' defaults and limits, as
    `model.HYPERPARAMETER_LIMITS` gives ours (type, test, the test in words)."""

    reference: str
    function: Callable
    defaults: dict[str, object]
    limits: dict[str, tuple[type, Callable[[object], bool], str]]


_LOADED: dict[str, Builder] = {}


def load(reference: str, reserved: tuple[str, ...] = ()) -> Builder:
    """The builder `reference` names ("package.module:function"), imported and its
    declaration checked; `reserved`: names it may not declare (digitune's own). A ValueError
    says what is wrong."""
    if reference in _LOADED:
        return _LOADED[reference]
    if not isinstance(reference, str) or not REFERENCE.fullmatch(reference):
        raise ValueError(
            f'expected "package.module:function" (a Python module and a function in it), '
            f"got {reference!r}"
        )
    module_name, function_name = reference.split(":")
    module = import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(
            f"module {module_name} ({module.__file__}) has no function {function_name}"
        )
    declared = getattr(function, "hyperparameters", None)
    if not isinstance(declared, dict):
        raise ValueError(
            f"{reference} declares no hyperparameters: give it a `hyperparameters` attribute, "
            '{name: {"default": ..., "low": ..., "high": ...} or {"default": ..., '
            '"choices": [...]}} ({} for none)'
        )
    defaults, limits = {}, {}
    for name, spec in declared.items():
        source = f"{reference} hyperparameter {name!r}"
        if name in reserved:
            raise ValueError(f"{source}: digitune's own; name the builder's something else")
        defaults[name], limits[name] = _declaration(spec, source)
    _LOADED[reference] = Builder(reference, function, defaults, limits)
    return _LOADED[reference]


def import_module(module_name: str):
    """The builder's module, imported with the project folder first on Python's path."""
    project = str(config.project_dir())
    if project not in sys.path:
        sys.path.insert(0, project)
    try:
        return importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 -- missing module, or its code fails
        raise ValueError(
            f"cannot import {module_name} (looked in the project folder {project} and the "
            f"installed packages): {type(error).__name__}: {error}"
        ) from None


def source_sha256(reference: str) -> str:
    """The SHA-256 of the builder's module file as it is on disk now ("" for a module
    without one): workers of one study must build the same networks."""
    path = getattr(import_module(reference.split(":")[0]), "__file__", None)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else ""


def _declaration(spec: object, source: str) -> tuple[object, tuple]:
    """A declared hyperparameter's default and limits; a ValueError naming `source` unless
    the declaration is whole and its default within its limits."""
    if not isinstance(spec, dict) or "default" not in spec:
        raise ValueError(f'{source}: expected {{"default": ..., "low": ..., "high": ...}}')
    unknown = sorted(set(spec) - _DECLARATION_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}")
    default = spec["default"]
    kind = next(
        (kind for kind in (bool, int, float, str) if type(default) is kind),
        None,
    )
    if kind is None or (kind is float and not math.isfinite(default)):
        raise ValueError(f"{source}: the default must be a number, a string or a bool")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or default not in choices:
            raise ValueError(f"{source}: 'choices' must be a list holding the default")
        choices = tuple(choices)
        limits = (kind, lambda value: value in choices, f"one of {', '.join(map(str, choices))}")
    elif kind is bool:
        limits = (bool, lambda value: True, "")
    elif kind is str:
        raise ValueError(f"{source}: a string takes 'choices'")
    else:
        low, high = spec.get("low", -math.inf), spec.get("high", math.inf)
        if not all(
            isinstance(end, (int, float)) and not isinstance(end, bool) for end in (low, high)
        ):
            raise ValueError(f"{source}: 'low' and 'high' must be numbers")
        if not low <= default <= high:
            raise ValueError(f"{source}: the default {default!r} is outside [{low}, {high}]")
        words = (
            " ".join(
                part
                for part in (
                    f"from {low}" if math.isfinite(low) else "",
                    f"to {high}" if math.isfinite(high) else "",
                )
                if part
            )
            or "any"
        )
        limits = (kind, lambda value: low <= value <= high, words)
    return default, limits


def network(builder: Builder, params: dict, shape: tuple[int, int, int], classes: int):
    """The builder's network for `params`, checked: a Keras model taking pictures of `shape`
    and giving one value per class."""
    built = builder.function(dict(params), tuple(shape), int(classes))
    if not isinstance(built, keras.Model):
        raise ValueError(f"{builder.reference} returned {type(built).__name__}, not a keras.Model")
    expected = {"takes": (None, *shape), "gives": (None, classes)}
    found = {"takes": tuple(built.input_shape), "gives": tuple(built.output_shape)}
    for what in expected:
        if found[what] != expected[what]:
            raise ValueError(
                f"{builder.reference} built a model that {what} {found[what]}; "
                f"this data needs one that {what} {expected[what]}"
            )
    return built
