"""The MLflow model registry: test a study's best model and register it as a new version of
its model (`[registry] model_name`, `mnist-cnn` for the default study).

`register_best` rebuilds the best trial's model from its logged weights, evaluates it on the
test set (the only time the test set is touched) and registers it as `@challenger`; every
other registration (refit, ensemble) goes through `register`, the one place that registers.

Versions are addressed by alias (`challenger` for a study's newest best model, `champion`
for the one in production), never by the deprecated stages. Every version is a Keras file
(an ensemble too: one Keras model that averages its members), which `load` reads in Keras's
safe mode and nothing else: serve, promote, rollback and export run no code from the
registry. Any client can load one with `mlflow.pyfunc.load_model("models:/mnist-cnn@champion")`.
Every function takes the model's name; MNIST's `mnist-cnn` is the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import json
import logging
import os
import subprocess
import sys

import keras
import mlflow
import mlflow.keras
import numpy as np
import optuna
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from digitune import (
    artifacts,
    backend,
    config,
    data,
    evaluate,
    loader,
    locks,
    model,
    pareto,
    space,
    tracking,
)

log = logging.getLogger(__name__)

MODEL_NAME = config.REGISTERED_MODEL_NAME


def signature(shape=model.IMAGE_SHAPE, classes: int = model.NUM_CLASSES) -> ModelSignature:
    """Unnamed tensors: a named input makes pyfunc hand the model a dict rather than the
    array a Keras model takes. Input: (N, height, width, channels) float32 in [0, 1]; output:
    one probability per class. MNIST's is (N, 28, 28, 1) and ten."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
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
    model_name: str = MODEL_NAME,
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
    description: str | None = None,
) -> mlflow.entities.model_registry.ModelVersion:
    """Log `model` (one network, or an ensemble's averaging model) in Keras's own format,
    register it as a version of `model_name` with readable tags, a description and `alias`.
    The one place that registers, and safe to run again after a crash anywhere in it: a
    version is created with its identity tags in one call and completed (`finish`) by the
    rerun rather than registered twice; a version registered whole is returned as it is."""
    tags = {
        "study": study_name,
        "trial": str(trial_number),
        "validation_accuracy": f"{validation_accuracy:.4f}",
        "test_accuracy": f"{test_accuracy:.4f}",
        "test_images": str(test_images),
        "data_sha256": data_sha256,
        "engine": engine,
        "format": loader.FORMAT,
        **(extra_tags or {}),
    }
    # A network of the user's own: its builder's module is imported where the version loads.
    # (`model` here is the network; the param and the tag are both "builder".)
    if params.get(loader.BUILDER_TAG):
        tags[loader.BUILDER_TAG] = params[loader.BUILDER_TAG]
    # Under a lock: of processes registering at once (the workers of one study finishing
    # together, three `register` pods), one creates the version and the others find it.
    with registration_lock(model_name):
        existing = find_registration(tags, model_name) or _create_version(
            model, model_name, params, tags
        )
    return finish(existing, params, alias, description, model_name)


# Held while a version is looked for and created; as long as logging a model may take.
REGISTRATION_LOCK_SUFFIX = ".registration-lock"
REGISTRATION_WAIT_SECONDS = 600.0


@contextlib.contextmanager
def registration_lock(model_name: str):
    """Hold the lock on creating versions of `model_name` for the block."""
    what = f"registering into '{model_name}' (another process registers)"
    name = model_name + REGISTRATION_LOCK_SUFFIX
    try:
        with locks.held(mlflow.MlflowClient(), name, what, REGISTRATION_WAIT_SECONDS):
            yield
    except locks.LockedError as error:
        raise RegistryError(str(error)) from None


def _create_version(model, model_name: str, params: dict, tags: dict[str, str]):
    """Log `model` and register it as a new version of `model_name` with its identity tags."""
    if getattr(model, "optimizer", None) is not None:
        # A registered model serves and trains no more: its file holds no optimizer,
        # whose state Keras would otherwise warn about on every load.
        compiled, model = model, keras.models.clone_model(model)
        model.set_weights(compiled.get_weights())
    metadata = {
        "dataset": tags.get("dataset", "mnist"),
        "class_names": json.loads(tags.get("class_names", "null"))
        or [str(index) for index in range(data_params(params)["num_classes"])],
    }
    # MLflow prints "Successfully registered model" and "Created version" to stderr;
    # digitune says which version it registered in one line of its own. Warnings still
    # show: they go through `logging` and `warnings`, not these streams.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature_of(params),
            # The model's own metadata (its MLmodel file) names its classes, for any client.
            metadata=metadata,
            pip_requirements=pip_requirements(),
        )
        # The tags that find it again are set as it is created, in the same call.
        return mlflow.register_model(info.model_uri, model_name, tags=tags)


def finish(
    version, params: dict, alias: str | None, description: str | None = None, model_name=MODEL_NAME
):
    """Complete a version's registration where it stopped: its description, its alias, and
    last the tag that says it is whole. A version registered whole is returned unchanged."""
    if version.tags.get(REGISTRATION_TAG) == "complete":
        log.info(
            "trial %s is already registered as version %s",
            version.tags.get("trial"),
            version.version,
        )
        return version
    client = mlflow.MlflowClient()
    client.update_model_version(
        model_name, version.version, description=description or describe(version.tags, params)
    )
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version.version)
    client.set_model_version_tag(model_name, version.version, REGISTRATION_TAG, "complete")
    return client.get_model_version(model_name, version.version)


# Set last, once a version's tags, description and alias are all in place.
REGISTRATION_TAG = "registration"
# What tells one registration from another: the same trial registered twice is one version.
IDENTITY_TAGS = ("study", "trial", "kind", "data_sha256", "members", "format")


def find_registration(tags: dict[str, str], model_name: str = MODEL_NAME):
    """The version registered (wholly or in part) with these identity tags, or None."""
    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{model_name}' and tags.study = '{tags['study']}' "
        f"and tags.trial = '{tags['trial']}'"
    )
    wanted = {key: tags.get(key) for key in IDENTITY_TAGS}
    same = [v for v in versions if {key: v.tags.get(key) for key in IDENTITY_TAGS} == wanted]
    return min(same, key=lambda v: int(v.version)) if same else None


def aliases_of(model_name: str, version) -> str:
    """A version's aliases as a person reads them ("alias @challenger"), from the registry:
    a trial registered before keeps the aliases it has."""
    aliases = sorted(mlflow.MlflowClient().get_model_version(model_name, str(version)).aliases)
    if not aliases:
        return "no alias"
    return ("alias " if len(aliases) == 1 else "aliases ") + ", ".join(f"@{a}" for a in aliases)


def data_params(params: dict) -> dict:
    """The input shape's and classes' params among `params` (MNIST's where absent; an
    ensemble's params hold nothing else)."""
    given = {key: value for key, value in params.items() if key in model.DATA_PARAMS}
    return {**model.DATA_PARAMS, **given}


def signature_of(params: dict) -> ModelSignature:
    """The signature of a model built from `params`: its input shape and classes."""
    shape = data_params(params)
    return signature(model.image_shape(shape), int(shape["num_classes"]))


def describe_version(
    version, tags: dict[str, str], description: str, alias: str | None, model_name=MODEL_NAME
) -> mlflow.entities.model_registry.ModelVersion:
    """Tag a new version, give it its description and point `alias` (if any) at it."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.update_model_version(model_name, version, description=description)
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)
    return client.get_model_version(model_name, version)


def find_version(study_name: str, trial_number: int, kind: str = "trial", model_name=MODEL_NAME):
    """The version made from this study's trial (`kind` "trial") or from its configuration
    refitted on all training images (`kind` "refit") and registered whole, or None."""
    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{model_name}' and tags.study = '{study_name}' and tags.trial = '{trial_number}'"
    )
    versions = [
        v
        for v in versions
        if v.tags.get("kind", "trial") == kind and v.tags.get(REGISTRATION_TAG) == "complete"
    ]
    return versions[0] if versions else None


def describe(tags: dict, params: dict) -> str:
    """The Markdown description a person reads on the version's page in the MLflow UI."""
    rows = "\n".join(f"| {name} | {space.readable(value, 4)} |" for name, value in params.items())
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
        f"({tags.get('dataset', 'mnist')} test set, {int(tags['test_images']):,} images)\n"
        f"- data SHA-256: `{tags['data_sha256']}`\n\n"
        f"| hyperparameter | value |\n|---|---|\n{rows}\n"
    )


RegistryError = loader.RegistryError


def version_by_alias(
    client: mlflow.MlflowClient, alias: str, required: bool = True, model_name: str = MODEL_NAME
):
    """The version an alias points at; None (or a RegistryError) when there is none."""
    try:
        client.get_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        names = [found.name for found in client.search_registered_models()]
        known = f" (registered models: {', '.join(sorted(names))})" if names else ""
        raise RegistryError(
            f"there is no registered model '{model_name}' in "
            f"{config.redact(mlflow.get_tracking_uri())}{known}; run `make tune` first, or "
            "name the model with --model (MODEL= in make)"
        ) from None
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        if required:
            raise RegistryError(f"'{model_name}' has no version with alias @{alias}") from None
        return None


def task_of(version) -> tuple[str, tuple[str, ...]]:
    """What a version learned: its dataset's name and its class names (MNIST's digits for a
    version registered before those tags existed)."""
    names = json.loads(version.tags.get("class_names") or "null") or data.DIGITS
    return version.tags.get("dataset", "mnist"), tuple(names)


def _listed(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:6])
    return f"{shown}, ... ({len(names)} classes)" if len(names) > 6 else shown


def task_difference(learned, learning) -> str | None:
    """How two tasks, as `task_of` gives them, differ in words; None when they are one."""
    (dataset, classes), (other_dataset, other_classes) = learned, learning
    if dataset != other_dataset:
        return f"it learned {other_dataset}, the champion {dataset}"
    if classes != other_classes:
        return f"its classes are {_listed(other_classes)}; the champion's are {_listed(classes)}"
    return None


def task_problem(model_name: str, dataset: data.Dataset) -> str | None:
    """Why a study on `dataset` cannot register into `model_name` (whose versions learned
    another task), or None: the champion's task is the model's, else its newest version's."""
    client = mlflow.MlflowClient()
    try:
        version = version_by_alias(client, config.CHAMPION_ALIAS, False, model_name)
    except RegistryError:  # No such model yet: this study's will be its first version.
        return None
    if version is None:
        newest = client.search_model_versions(
            f"name = '{model_name}'", max_results=1, order_by=["version_number DESC"]
        )
        if not newest:
            return None
        version = newest[0]
    difference = task_difference(task_of(version), (dataset.name, tuple(dataset.class_names)))
    if difference is None:
        return None
    return (
        f"registered model '{model_name}' holds models of another task: version "
        f"{version.version} learned {task_of(version)[0]} ({_listed(task_of(version)[1])}), "
        f"and this study trains on {dataset.name} ({_listed(tuple(dataset.class_names))})"
    )


def versions_table(client: mlflow.MlflowClient, model_name: str = MODEL_NAME) -> pd.DataFrame:
    """Every version with its aliases, test accuracy and where it came from."""
    versions = client.search_model_versions(f"name = '{model_name}'")
    # Searched versions come without their aliases; the registered model has them all.
    aliases = client.get_registered_model(model_name).aliases
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


@dataclasses.dataclass(frozen=True)
class BestTrial:
    """The best trial of a study, whichever engine ran it: enough to rebuild its model."""

    study_name: str
    number: int
    params: dict
    run_id: str
    validation_accuracy: float
    engine: str = "optuna"
    costs: dict | None = None  # in a study with [objectives]: `deployment.measure`'s

    @classmethod
    def of(cls, study: optuna.Study, number: int | None = None) -> BestTrial:
        """The study's best trial (the most accurate within its limits), or trial `number`."""
        best = pareto.best_trial(study) if number is None else study.trials[number]
        return cls(
            study.study_name,
            best.number,
            space.params_of(best),
            best.user_attrs[tracking.TRIAL_RUN_ATTR],
            pareto.accuracy(best),
            costs=best.user_attrs.get(pareto.COSTS_ATTR),
        )


def register_best(
    best: BestTrial,
    definition,
    dataset: data.Dataset,
    parent_run_id: str,
    registering: bool = True,
    run_id: str | None = None,
    storage: str | None = None,
) -> tuple[float, str | None]:
    """Rebuild the best trial's model from its params and weights, evaluate it on the test
    set into the parent run (or `run_id`), and (with `registering`) register it as @challenger,
    with its costs as tags and its int8 TFLite file beside it when it has them, unless that
    trial already is. Returns the test accuracy and the registered version."""
    model_name = definition.model_name
    with mlflow.start_run(run_id=run_id or parent_run_id):
        cnn = artifacts.load_model(best.params, best.run_id)
        test = evaluate.evaluate(cnn, data.preprocess(dataset.test_images), dataset.test_labels)
        artifacts.log_evaluation(
            test, "test", f"trial {best.number}, {dataset.name} test set", dataset.class_names
        )
        mlflow.log_metrics(
            {"test_accuracy": test.accuracy, "best_val_accuracy": best.validation_accuracy}
        )
        mlflow.set_tags({"best_trial": str(best.number)})
        if not registering:
            return test.accuracy, None
        if keras.backend.backend() != "tensorflow":
            # A registered model is an exported SavedModel, which only TensorFlow writes.
            return test.accuracy, register_in_tensorflow(definition.path, storage)
        cost_tags = pareto.version_tags(best.costs)
        existing = find_version(best.study_name, best.number, model_name=model_name)
        if existing is not None:
            log.info("trial %d is already registered as version %s", best.number, existing.version)
            return test.accuracy, str(existing.version)
        if best.costs:
            artifacts.copy_int8_file(best.run_id)
        version = register(
            cnn,
            model_name=model_name,
            study_name=best.study_name,
            trial_number=best.number,
            params=best.params,
            validation_accuracy=best.validation_accuracy,
            test_accuracy=test.accuracy,
            test_images=len(dataset.test_labels),
            data_sha256=dataset.digest,
            engine=best.engine,
            extra_tags={**data.version_tags(dataset, definition.data), **cost_tags},
        )
    return test.accuracy, str(version.version)


def register_in_tensorflow(study_path, storage: str | None) -> str | None:
    """Register a study's best trial from a TensorFlow process (`digitune register`), for a
    study trained on another backend: Keras's weight files are the same on every backend.
    Returns the version, or None, with a warning that says how, where TensorFlow is missing."""
    if not backend.installed("tensorflow"):
        log.warning(
            "TensorFlow is not installed here, and a registered model is a SavedModel that "
            "only it writes: the best trial's weights are in MLflow; register them from a "
            "machine with TensorFlow that shares the stores: digitune register --study %s",
            study_path,
        )
        return None
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow"}
    if storage:
        environment["DIGITUNE_STORAGE"] = storage  # never on a command line
    command = [sys.executable, "-m", "digitune", "register", "--study", str(study_path), "--json"]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    if finished.returncode != 0:
        last = (finished.stderr.strip().splitlines() or ["(no message)"])[-1]
        log.warning("registering in a TensorFlow process failed: %s", config.redact(last))
        return None
    return json.loads(finished.stdout)["model_version"]
