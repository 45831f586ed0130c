"""The MLflow model registry: register a study's best model as a new version of `mnist-cnn`.

Versions are addressed by alias (`challenger` for a study's newest best model, `champion`
for the one in production), never by the deprecated stages: load one with
`mlflow.pyfunc.load_model("models:/mnist-cnn@challenger")`.
"""

from __future__ import annotations

import mlflow
import mlflow.keras
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from digitune import config, model

SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.IMAGE_SHAPE), "image")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.NUM_CLASSES), "probabilities")]),
)


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's inference of requirements reloads the model in a subprocess,
    # which costs seconds for every logged model.
    import keras
    import tensorflow as tf

    return [
        f"tensorflow=={tf.__version__}",
        f"keras=={keras.__version__}",
        f"numpy=={np.__version__}",
    ]


def register(
    keras_model,
    *,
    study_name: str,
    trial_number: int,
    params: dict,
    validation_accuracy: float,
    test_accuracy: float,
    test_images: int,
    data_sha256: str,
    alias: str = config.CHALLENGER_ALIAS,
) -> mlflow.entities.model_registry.ModelVersion:
    """Log `keras_model` to the active run and register it with `alias` and readable tags."""
    info = mlflow.keras.log_model(
        keras_model,
        name="model",
        signature=SIGNATURE,
        pip_requirements=_pip_requirements(),
        registered_model_name=config.REGISTERED_MODEL_NAME,
    )
    client = mlflow.MlflowClient()
    version = info.registered_model_version
    tags = {
        "study": study_name,
        "trial": str(trial_number),
        "validation_accuracy": f"{validation_accuracy:.4f}",
        "test_accuracy": f"{test_accuracy:.4f}",
        "test_images": str(test_images),
        "data_sha256": data_sha256,
    }
    for key, value in tags.items():
        client.set_model_version_tag(config.REGISTERED_MODEL_NAME, version, key, value)
    client.update_model_version(
        config.REGISTERED_MODEL_NAME, version, description=describe(tags, params)
    )
    client.set_registered_model_alias(config.REGISTERED_MODEL_NAME, alias, version)
    return client.get_model_version(config.REGISTERED_MODEL_NAME, version)


def find_version(study_name: str, trial_number: int):
    """The registered version made from this study's trial, or None."""
    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{config.REGISTERED_MODEL_NAME}' and tags.study = '{study_name}' "
        f"and tags.trial = '{trial_number}'"
    )
    return versions[0] if versions else None


def describe(tags: dict, params: dict) -> str:
    """The Markdown description a person reads on the version's page in the MLflow UI."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in params.items())
    return (
        f"Best trial {tags['trial']} of study **{tags['study']}**.\n\n"
        f"- validation accuracy: {tags['validation_accuracy']}\n"
        f"- test accuracy: {tags['test_accuracy']} (MNIST test set, {tags['test_images']} images)\n"
        f"- data SHA-256: `{tags['data_sha256']}`\n\n"
        f"| hyperparameter | value |\n|---|---|\n{rows}\n"
    )
