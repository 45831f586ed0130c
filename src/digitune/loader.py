"""Load a registered version the one way digitune trusts: its Keras file, in Keras's safe mode.

A registry that others can write to must not be a way to run code here. A version is loaded
only when it is a Keras file that a digitune study registered (an ensemble too: one Keras
model averaging its members); a pyfunc model of Python code, an exported TensorFlow
SavedModel, a Keras file holding code (a Lambda layer) or a version without digitune's tags
is refused, saying why. `serve`, `promote`, `rollback`, `select` and `export` load through
`load`; any other client can still use `mlflow.pyfunc.load_model` on digitune's versions.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np

from digitune import builder, model


class RegistryError(RuntimeError):
    """The registry lacks what a command needs (a model, an alias, a version's files), or
    holds a version digitune will not load."""


# How digitune registers a network and loads one: a Keras file, which loads in Keras's safe
# mode. Versions registered as TensorFlow SavedModels (before this tag) are not loaded.
FORMAT = "keras"
KERAS_FILE = Path("data") / "model.keras"  # where MLflow's Keras flavour keeps it
# The builder of a version whose network is a user's own (`digitune.builder`): its module,
# imported before the version loads, registers the network's own layers with Keras.
BUILDER_TAG = "builder"
# Images per call into a model: its memory stays that of one batch, whatever the size of
# the test set or of its pictures.
PREDICT_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A registered version as digitune loads it: its network, and its MLmodel metadata."""

    network: keras.Model
    metadata: mlflow.models.Model

    def predict(self, images) -> np.ndarray:
        """Class probabilities, through Keras's compiled inference step (about as fast as an
        exported SavedModel's), PREDICT_BATCH images at a time."""
        batches = [  # A slice at a time: `data.Pictures` are read only as they are predicted.
            np.asarray(
                self.network.predict_on_batch(
                    np.asarray(images[start : start + PREDICT_BATCH], dtype="float32")
                )
            )
            for start in range(0, len(images), PREDICT_BATCH)
        ]
        return (
            np.concatenate(batches)
            if batches
            else np.zeros((0, *self.network.output_shape[1:]), "float32")
        )


def load(version) -> Loaded:
    """Load a registered version the one way digitune does: its Keras file, in safe mode, so
    nothing in the registry runs as Python here. Anything else is refused with its reason: a
    pyfunc model of Python code, an exported SavedModel, a Keras file holding code (a Lambda
    layer), a version no digitune study registered, files that are missing."""
    uri = f"models:/{version.name}/{version.version}"
    # MLflow leaves downloads from a tracking server in a temporary folder for good; a
    # service that reloads would leave one per version.
    with tempfile.TemporaryDirectory(prefix="digitune-model-") as scratch:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=scratch))
            metadata = mlflow.models.Model.load(folder / "MLmodel")
        except Exception as error:  # noqa: BLE001 -- missing files, unreadable model, ...
            raise RegistryError(f"cannot load {uri} (source {version.source}): {error}") from None
        reason = refusal(version, metadata, folder)
        try:
            if not reason and version.tags.get(BUILDER_TAG):
                reason = _import_builder(version.tags[BUILDER_TAG])
            network = (
                None
                if reason
                else keras.saving.load_model(
                    str(folder / KERAS_FILE), compile=False, safe_mode=True
                )
            )
        except Exception as error:  # noqa: BLE001 -- Keras refuses code, or the file is bad.
            reason = f"its Keras file does not load in safe mode ({error})"
    if reason:
        raise RegistryError(
            f"refusing to load {uri}: {reason}. digitune loads only the Keras files its "
            "studies register, in Keras's safe mode"
        )
    return Loaded(network, metadata)


def _import_builder(reference: str) -> str | None:
    """Import the module of a version's builder from this machine's project folder or
    installed packages, never from the registry; why it cannot be, or None."""
    if not builder.REFERENCE.fullmatch(reference):
        return f"its builder tag {reference!r} is not a package.module:function"
    try:
        builder.import_module(reference.split(":")[0])
    except ValueError as error:
        return f"its network's builder {reference} is needed to load it here, but {error}"
    return None


def refusal(version, metadata: mlflow.models.Model, folder: Path) -> str | None:
    """Why a downloaded version is not one digitune registered as a Keras file, or None."""
    keras_flavor = metadata.flavors.get("keras")
    if keras_flavor is None:
        loader = metadata.flavors.get("python_function", {}).get("loader_module")
        return (
            f"it is not a Keras model (flavours {', '.join(metadata.flavors) or 'none'}"
            + (f", loaded by {loader}" if loader else "")
            + ")"
        )
    if keras_flavor.get("save_exported_model"):
        return (
            "it is an exported TensorFlow SavedModel, a graph program rather than a Keras file "
            "(older digitune registered these); register its trial again: digitune register "
            f"--study studies/<its study>.toml (study '{version.tags.get('study', '?')}')"
        )
    if "study" not in version.tags or version.tags.get("format") != FORMAT:
        return "no digitune study registered it (it lacks the study and format tags)"
    if not (folder / KERAS_FILE).is_file():
        return f"it holds no Keras file at {KERAS_FILE.as_posix()}"
    return None


def input_shape(loaded: Loaded) -> tuple[int, int, int]:
    """The (height, width, channels) a loaded version takes, from its signature (MNIST's for
    a version without one)."""
    schema = loaded.metadata.get_input_schema()
    if schema is None or not schema.inputs:
        return model.IMAGE_SHAPE
    height, width, channels = schema.inputs[0].shape[1:]
    return (int(height), int(width), int(channels))
