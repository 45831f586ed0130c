"""The MLflow model registry: register a study's best model as a new version of `mnist-cnn`.

Versions are addressed by alias (`challenger` for a study's newest best model, `champion`
for the one in production), never by the deprecated stages: load one with
`mlflow.pyfunc.load_model("models:/mnist-cnn@challenger")`.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import io
import json
import os
import socket
import tempfile
import time

import mlflow
import mlflow.keras
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from digitune import config, model

# Unnamed tensors: a named input makes pyfunc hand the model a dict, which the exported
# serving function refuses. Input: (N, 28, 28, 1) float32 in [0, 1]; output: ten probabilities.
SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *model.IMAGE_SHAPE))]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.NUM_CLASSES))]),
)


def pip_requirements() -> list[str]:
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
    model,
    *,
    study_name: str,
    trial_number: int | str,
    params: dict,
    validation_accuracy: float,
    test_accuracy: float,
    test_images: int,
    data_sha256: str,
    engine: str = "optuna",
    extra_tags: dict[str, str] | None = None,
    alias: str = config.CHALLENGER_ALIAS,
    artifacts: dict[str, str] | None = None,
    description: str | None = None,
) -> mlflow.entities.model_registry.ModelVersion:
    """Log `model` to the active run, register it as a new version of `mnist-cnn` with
    readable tags and a description, and point `alias` at it.

    `model` is a Keras model (logged as an exported SavedModel) or an MLflow `PythonModel`
    with its `artifacts` (an ensemble); both get the same signature, so serving, promotion
    and rollback treat every version alike. This is the one place that registers.
    """
    common = {
        "name": "model",
        "signature": SIGNATURE,
        "pip_requirements": pip_requirements(),
        "registered_model_name": config.REGISTERED_MODEL_NAME,
    }
    # MLflow prints "Successfully registered model" and "Created version" to stderr, and
    # Keras's export every traced endpoint and captured tensor to stdout; digitune says
    # which version it registered in one line of its own. Warnings still show: they go
    # through `logging` and `warnings`, not these streams.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if isinstance(model, mlflow.pyfunc.PythonModel):
            info = mlflow.pyfunc.log_model(python_model=model, artifacts=artifacts, **common)
        else:
            # An exported SavedModel: its pyfunc calls the traced serving function directly,
            # about 1 ms an image here, where Keras's `predict` costs some 50 ms a call.
            info = mlflow.keras.log_model(model, save_exported_model=True, **common)
    tags = {
        "study": study_name,
        "trial": str(trial_number),
        "validation_accuracy": f"{validation_accuracy:.4f}",
        "test_accuracy": f"{test_accuracy:.4f}",
        "test_images": str(test_images),
        "data_sha256": data_sha256,
        "engine": engine,
        **(extra_tags or {}),
    }
    return describe_version(
        info.registered_model_version, tags, description or describe(tags, params), alias
    )


def describe_version(
    version, tags: dict[str, str], description: str, alias: str | None
) -> mlflow.entities.model_registry.ModelVersion:
    """Tag a new version, give it its description and point `alias` (if any) at it."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(config.REGISTERED_MODEL_NAME, version, key, value)
    client.update_model_version(config.REGISTERED_MODEL_NAME, version, description=description)
    if alias is not None:
        client.set_registered_model_alias(config.REGISTERED_MODEL_NAME, alias, version)
    return client.get_model_version(config.REGISTERED_MODEL_NAME, version)


def find_version(study_name: str, trial_number: int, kind: str = "trial"):
    """The registered version made from this study's trial (`kind` "trial") or from its
    configuration refitted on all training images (`kind` "refit"), or None."""
    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{config.REGISTERED_MODEL_NAME}' and tags.study = '{study_name}' "
        f"and tags.trial = '{trial_number}'"
    )
    versions = [v for v in versions if v.tags.get("kind", "trial") == kind]
    return versions[0] if versions else None


def describe(tags: dict, params: dict) -> str:
    """The Markdown description a person reads on the version's page in the MLflow UI."""
    rows = "\n".join(f"| {name} | {value} |" for name, value in params.items())
    what = (
        f"Best trial {tags['trial']} of study **{tags['study']}**"
        if tags.get("kind", "trial") == "trial"
        else f"Best trial {tags['trial']} of study **{tags['study']}**, retrained on all "
        f"{tags.get('train_images', '60000')} training images for {tags.get('epochs')} epochs"
    )
    return (
        f"{what}.\n\n"
        f"- validation accuracy: {tags['validation_accuracy']}\n"
        f"- test accuracy: {tags['test_accuracy']} "
        f"(MNIST test set, {int(tags['test_images']):,} images)\n"
        f"- data SHA-256: `{tags['data_sha256']}`\n\n"
        f"| hyperparameter | value |\n|---|---|\n{rows}\n"
    )


class RegistryError(RuntimeError):
    """The registry lacks what a command needs (a model, an alias, a version's files)."""


HISTORY_TAG = "champion_history"
# Registered-model tags hold at most a few thousand characters: keep the newest events.
HISTORY_LIMIT = 40


def version_by_alias(client: mlflow.MlflowClient, alias: str, required: bool = True):
    """The version an alias points at; None (or a RegistryError) when there is none."""
    try:
        client.get_registered_model(config.REGISTERED_MODEL_NAME)
    except mlflow.exceptions.MlflowException:
        raise RegistryError(
            f"there is no registered model '{config.REGISTERED_MODEL_NAME}' in "
            f"{config.redact(mlflow.get_tracking_uri())}; run `make tune` first"
        ) from None
    try:
        return client.get_model_version_by_alias(config.REGISTERED_MODEL_NAME, alias)
    except mlflow.exceptions.MlflowException:
        if required:
            raise RegistryError(
                f"'{config.REGISTERED_MODEL_NAME}' has no version with alias @{alias}"
            ) from None
        return None


def load_pyfunc(version) -> mlflow.pyfunc.PyFuncModel:
    """Load a registered version as a pyfunc model, naming it when its files are missing."""
    uri = f"models:/{config.REGISTERED_MODEL_NAME}/{version.version}"
    try:
        return load_without_leftovers(uri)
    except Exception as error:  # noqa: BLE001 -- missing files, unreadable model, ...
        raise RegistryError(f"cannot load {uri} (source {version.source}): {error}") from None


def load_without_leftovers(uri: str) -> mlflow.pyfunc.PyFuncModel:
    """`mlflow.pyfunc.load_model`, downloading into a folder that is removed once the model is
    in memory. From a tracking server MLflow otherwise leaves every download in a temporary
    folder for good, and a service that reloads would leave one per version."""
    with tempfile.TemporaryDirectory(prefix="digitune-model-") as scratch:
        return mlflow.pyfunc.load_model(uri, dst_path=scratch)


def history(client: mlflow.MlflowClient) -> list[dict]:
    """The champion's history, oldest first: who became champion when, and why."""
    tags = client.get_registered_model(config.REGISTERED_MODEL_NAME).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


# The lock that makes moving @champion a compare-and-set: a registered model of this name,
# which the store lets one caller create (names are unique: a database constraint in SQLite
# and PostgreSQL, the same check behind a tracking server). One left behind by a killed
# process is taken over once it is this old.
LOCK_SUFFIX = ".champion-lock"
LOCK_WAIT_SECONDS = 60.0
LOCK_STALE_SECONDS = 300.0


@contextlib.contextmanager
def champion_lock(client: mlflow.MlflowClient):
    """Hold the lock on @champion and its history for the block; waits up to
    `LOCK_WAIT_SECONDS` for another promote or rollback to finish."""
    name = config.REGISTERED_MODEL_NAME + LOCK_SUFFIX
    holder = f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"holder": holder},
                description="Held while digitune moves @champion; deleted when it is done.",
            )
            break
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # Released meanwhile.
            lock = client.get_registered_model(name)
            age = time.time() - lock.creation_timestamp / 1000
            if age > LOCK_STALE_SECONDS:
                client.delete_registered_model(name)
                continue
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"@champion is locked by {lock.tags.get('holder', 'another process')} "
                    f"since {age:.0f} s (another promote or rollback); nothing changed. Run it "
                    f"again later, or delete the registered model '{name}' if that process is "
                    "gone"
                )
        time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(name)


def move_champion(client, version: str, previous: str | None, action: str, reason: str, **extra):
    """Point @champion at `version` and record the move in the registered model's tags, only
    if @champion still is `previous` (None: no champion): a compare-and-set under the
    champion lock, so two promotions never both win and no history event is lost."""
    with champion_lock(client):
        current = version_by_alias(client, config.CHAMPION_ALIAS, required=False)
        current_version = str(current.version) if current is not None else None
        if current_version != previous:
            raise RegistryError(
                f"@champion moved to version {current_version} (it was {previous} when this "
                f"{action} started); nothing changed. Run it again to compare with the new "
                "champion"
            )
        events = history(client)
        events.append(
            {
                "action": action,
                "version": version,
                "previous": previous,
                "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "by": getpass.getuser(),
                "reason": reason,
                **extra,
            }
        )
        client.set_registered_model_alias(
            config.REGISTERED_MODEL_NAME, config.CHAMPION_ALIAS, version
        )
        client.set_registered_model_tag(
            config.REGISTERED_MODEL_NAME, HISTORY_TAG, json.dumps(events[-HISTORY_LIMIT:])
        )


def champion_stack(events: list[dict]) -> list[str]:
    """Replay the history: promotions push a version, rollbacks pop one."""
    stack: list[str] = []
    for event in events:
        if event["action"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(event["version"])
    return stack


def rollback(client: mlflow.MlflowClient) -> tuple[str, str]:
    """Move @champion back to the previous champion; returns (from, to) versions."""
    current = version_by_alias(client, config.CHAMPION_ALIAS)
    stack = champion_stack(history(client))
    if len(stack) < 2 or stack[-1] != str(current.version):
        raise RegistryError(
            f"no previous champion to roll back to (the history holds {stack or 'nothing'}, "
            f"@champion is version {current.version})"
        )
    target = client.get_model_version(config.REGISTERED_MODEL_NAME, stack[-2])
    load_pyfunc(target)  # Refuse to roll back onto a version whose files are gone.
    move_champion(
        client,
        str(target.version),
        str(current.version),
        "rollback",
        f"rollback of version {current.version}",
    )
    return str(current.version), str(target.version)


def versions_table(client: mlflow.MlflowClient) -> pd.DataFrame:
    """Every version with its aliases, test accuracy and where it came from."""
    versions = client.search_model_versions(f"name = '{config.REGISTERED_MODEL_NAME}'")
    # Searched versions come without their aliases; the registered model has them all.
    aliases = client.get_registered_model(config.REGISTERED_MODEL_NAME).aliases
    rows = [
        {
            "version": int(v.version),
            "aliases": ", ".join(
                f"@{alias}" for alias, version in aliases.items() if str(version) == str(v.version)
            ),
            "test_accuracy": v.tags.get("test_accuracy", ""),
            "validation_accuracy": v.tags.get("validation_accuracy", ""),
            "study": v.tags.get("study", ""),
            "trial": v.tags.get("trial", ""),
            "created": datetime.datetime.fromtimestamp(v.creation_timestamp / 1000).strftime(
                "%Y-%m-%d %H:%M"
            ),
        }
        for v in versions
    ]
    return pd.DataFrame(rows).sort_values("version") if rows else pd.DataFrame(rows)
