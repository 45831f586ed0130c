"""Keras Tuner as a second engine: the same study file, data split, model builder, trainer,
budget and MLflow layout as the Optuna engine, so the MLflow UI compares the two directly.

    digitune tune --engine keras-tuner                          Hyperband
    digitune tune --engine keras-tuner --algorithm bayesian     Bayesian optimisation

The study's search space becomes Keras Tuner hyperparameters in `hyperparameters`, the one
place that translation happens, and the study becomes a hypermodel (`CnnHyperModel`) that
builds with `model.build_model` and trains with `trainer.fit`, exactly as Optuna trials do.
Keras Tuner keeps its own state (oracle, checkpoints) in
`studies/<study>-keras-tuner-<algorithm>/`, so running the same command again resumes.

Keras Tuner 1.4.8 imports `tensorboard` in every trial on the TensorFlow backend, and
TensorFlow 2.21 no longer installs it, so digitune depends on tensorboard itself; without it
every trial would fail.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import keras
import keras_tuner
import mlflow
import optuna

from digitune import (
    artifacts,
    backend,
    config,
    data,
    model,
    registry,
    space,
    study_file,
    tracking,
    trainer,
)
from digitune.engines import scaffold

log = logging.getLogger(__name__)

ALGORITHMS = ("hyperband", "bayesian")
ENGINE = "keras-tuner"
_PARENT_RUN_FILE = "mlflow_parent_run_id"


def hyperparameters(definition: study_file.StudyDefinition) -> keras_tuner.HyperParameters:
    """The study's [space] as Keras Tuner hyperparameters (fixed values stay out: the
    hypermodel adds them to every trial's params, as `space.suggest` does for Optuna)."""
    hp = keras_tuner.HyperParameters()
    for name, distribution in definition.distributions.items():
        parent = _parent(definition, name)
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            hp.Choice(name, list(distribution.choices), ordered=False, **parent)
            continue
        low, high = distribution.low, distribution.high
        sampling = "log" if distribution.log else "linear"
        if isinstance(distribution, optuna.distributions.FloatDistribution):
            hp.Float(name, low, high, step=distribution.step, sampling=sampling, **parent)
        else:
            # Keras Tuner reads an int range's step as a factor under log sampling, where
            # Optuna only allows step 1; so a log range has no step here.
            step = None if distribution.log else distribution.step
            hp.Int(name, low, high, step=step, sampling=sampling, **parent)
    return hp


def _parent(definition: study_file.StudyDefinition, name: str) -> dict:
    """Keras Tuner's form of a `when`: one parent hyperparameter and its values."""
    condition = definition.conditions.get(name)
    if not condition:
        return {}
    if len(condition) > 1:
        raise ValueError(
            f"{definition.path} [space] '{name}': its 'when' names "
            f"{', '.join(condition)}; Keras Tuner conditions a hyperparameter on one other "
            "only: name one, or tune with the optuna engine"
        )
    ((parent, values),) = condition.items()
    return {"parent_name": parent, "parent_values": list(values)}


class CnnHyperModel(keras_tuner.HyperModel):
    """Builds with `model.build_model` and trains with `trainer.fit`, as Optuna trials do."""

    def __init__(self, definition: study_file.StudyDefinition, split: data.Split):
        super().__init__(name="mnist_cnn")
        self.definition = definition
        self.split = split

    def params(self, hp: keras_tuner.HyperParameters) -> dict:
        """The trial's plain params: the file's fixed values plus the sampled ones."""
        sampled = {
            name: hp.get(name) for name in self.definition.distributions if hp.is_active(name)
        }
        return {**self.definition.fixed, **sampled}

    def build(self, hp):
        # Keras Tuner clears the Keras session before every build, and with it the dtype
        # policy, so the study's precision is set here.
        keras.mixed_precision.set_global_policy(
            backend.precision(self.definition.training.precision)[0]
        )
        cnn = model.build_model(self.params(hp))
        # Hyperband continues a trial from its checkpoint, optimizer state included; a built
        # optimizer loads that state instead of warning that it skipped it.
        cnn.optimizer.build(cnn.trainable_variables)
        return cnn

    def fit(self, hp, cnn, *args, epochs=1, initial_epoch=0, callbacks=(), **kwargs):
        return trainer.fit(
            cnn,
            self.params(hp),
            self.split,
            epochs,
            callbacks,
            initial_epoch=initial_epoch,
            settings=self.definition.training,
        )


def _tracked(tuner_class: type[keras_tuner.Tuner]) -> type[keras_tuner.Tuner]:
    """`tuner_class` with digitune's budget, per-trial MLflow runs and failure checks."""

    class TrackedTuner(tuner_class):
        def __init__(self, *, parent_run_id, n_trials, deadline, **kwargs):
            super().__init__(**kwargs)
            self.parent_run_id = parent_run_id
            self.n_trials = n_trials
            self.deadline = deadline

        def pre_create_trial(self):
            # Keras Tuner has no time limit; a reached budget is told to the oracle as its
            # `max_trials`, which makes it end the search before starting another trial.
            if len(self.oracle.trials) >= self.n_trials or (
                self.deadline is not None and time.time() > self.deadline
            ):
                # (-1, not 0, when no trial ran: the oracle reads 0 as "no limit".)
                self.oracle.max_trials = len(self.oracle.trials) or -1

        def run_trial(self, trial, *args, **kwargs):
            if trainer.STOP.is_set():
                raise KeyboardInterrupt
            number = int(trial.trial_id)
            keras.utils.set_random_seed(self.hypermodel.definition.study.seed + number)
            params = self.hypermodel.params(trial.hyperparameters)
            started = time.perf_counter()
            with tracking.trial_run(number, params, self.parent_run_id, ENGINE):
                mlflow.set_tags(_hyperband_tags(trial.hyperparameters.values))
                histories = super().run_trial(trial, *args, **kwargs)
                history = histories[-1].history
                # Early stopping restored the best epoch's weights: the matrix matches the
                # value, and the weights let `registry.register_best` rebuild the model.
                cnn = histories[-1].model
                validation = artifacts.evaluate_validation(cnn, self.hypermodel.split)
                trainer.check_learned(history, params, validation.confusion_matrix)
                artifacts.log_trial_result(cnn, validation, number)
            seconds = time.perf_counter() - started
            log.info(_trial_line(number, history, seconds, trial.hyperparameters))
            return histories

    TrackedTuner.__name__ = f"Tracked{tuner_class.__name__}"
    return TrackedTuner


def _hyperband_tags(values: dict) -> dict[str, str]:
    """Hyperband's bracket, round, epochs and the trial it continues, as run tags; the
    continued trial by its number (Keras Tuner's ids are zero-padded to a varying width)."""
    tags = {
        "hyperband_" + key.removeprefix("tuner/"): str(value)
        for key, value in values.items()
        if key.startswith("tuner/")
    }
    if "hyperband_trial_id" in tags:
        tags["hyperband_trial_id"] = tracking.trial_tag(tags["hyperband_trial_id"])
    return tags


# MNIST's tuning split trains on 50,000 images (`data.split`).
MNIST_TUNING_IMAGES = 50_000


def whole_passes(
    training: config.TrainingSettings, train_images: int = MNIST_TUNING_IMAGES
) -> config.TrainingSettings:
    """The study's training in whole passes over the training images, as many as one of its
    full trials trains: Hyperband's epochs as a user's Hyperband script has them (the race
    uses it). A study whose epochs are parts of a pass (`epoch_images`) would otherwise give
    Hyperband first brackets of a few thousand images each."""
    if not 0 < training.epoch_images < (training.train_images or train_images):
        return training
    images = training.max_epochs * training.epoch_images
    passes = max(1, round(images / (training.train_images or train_images)))
    return dataclasses.replace(training, max_epochs=passes, epoch_images=0)


def dropped_by_successive_halving(trial_tags: list[dict], max_epochs: int) -> set[int]:
    """Numbers of the completed Hyperband trials that stopped short of `max_epochs` and that no
    later trial continued: the ones successive halving dropped (or the budget cut off).
    `trial_tags` are the tags of a search's trial runs."""
    continued = {tags["hyperband_trial_id"] for tags in trial_tags if "hyperband_trial_id" in tags}
    return {
        int(tags["trial_number"])
        for tags in trial_tags
        if tags.get("state") == "COMPLETE"
        and int(tags.get("hyperband_epochs", max_epochs)) < max_epochs
        and tags["trial_number"] not in continued
    }


def run(
    source: str | Path | study_file.StudyDefinition,
    algorithm: str = "hyperband",
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
    register: bool = True,
    experiment: str | None = None,
    directory: Path | None = None,
) -> scaffold.Outcome:
    """Search the study's space with Keras Tuner's `algorithm` within the study's budget,
    then evaluate the best trial's model on the test set and (with `register`) register it
    as `challenger`, like the Optuna engine."""
    started = time.perf_counter()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    inputs = scaffold.prepare(source, n_trials, timeout_minutes)
    definition = inputs.definition
    if definition.objectives.measured:
        raise ValueError(
            f"{definition.path} [objectives]: costs and their limits are tuned by the Optuna "
            "engine only (Keras Tuner optimises one metric); run it without ENGINE=keras-tuner"
        )
    if definition.enqueued:
        log.warning(
            "%s: its [[enqueue]] warm start is Optuna's; Keras Tuner's %s starts from its own "
            "draws",
            definition.path,
            algorithm,
        )
    study_name = f"{definition.study.name}-{ENGINE}-{algorithm}"
    directory = directory or config.studies_dir() / study_name
    directory.mkdir(parents=True, exist_ok=True)
    parent_file = directory / _PARENT_RUN_FILE
    log.info(
        "study '%s' (Keras Tuner %s): %s training and %s validation images; state in %s",
        study_name,
        algorithm,
        f"{len(inputs.split.y_train):,}",
        f"{len(inputs.split.y_validation):,}",
        directory,
    )
    try:
        with scaffold.parent_run(
            inputs,
            experiment=experiment or definition.study.name,
            run_name=tracking.parent_run_name(definition.study.name, ENGINE, algorithm),
            run_id=parent_file.read_text().strip() if parent_file.exists() else None,
            tags={"study": study_name, "engine": ENGINE, "algorithm": algorithm},
        ) as parent_run_id:
            parent_file.write_text(parent_run_id)
            tuner = _make_tuner(inputs, algorithm, directory, parent_run_id)
            tuner.search(
                epochs=definition.training.max_epochs,
                callbacks=trainer.training_callbacks(
                    definition.training,
                    inputs.deadline,
                    trainer.images_per_epoch(definition.training, inputs.split),
                ),
                verbose=0,
            )
            if trainer.STOP.is_set():
                raise KeyboardInterrupt
            best = _best_trial(tuner, study_name)
            mlflow.MlflowClient().log_metric(parent_run_id, "trials", len(tuner.oracle.trials))
            test_accuracy, version = registry.register_best(
                best, definition, inputs.dataset, parent_run_id, register
            )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return scaffold.Outcome(
        study_name,
        ENGINE,
        time.perf_counter() - started,
        _states(tuner),
        best,
        test_accuracy,
        version,
        definition.model_name,
        parent_run_id,
    )


def _states(tuner) -> dict[str, int]:
    """The search's trials by how they ended, in Optuna's words."""
    words = {"COMPLETED": "complete", "FAILED": "fail", "INVALID": "fail"}
    counted: dict[str, int] = {}
    for trial in tuner.oracle.trials.values():
        state = words.get(str(trial.status), str(trial.status).lower())
        counted[state] = counted.get(state, 0) + 1
    return dict(sorted(counted.items()))


def _make_tuner(inputs: scaffold.Inputs, algorithm, directory, parent_run_id):
    definition = inputs.definition
    settings = definition.study
    common = {
        "hypermodel": CnnHyperModel(definition, inputs.split),
        "objective": keras_tuner.Objective(config.OBJECTIVE_METRIC, direction="max"),
        "hyperparameters": hyperparameters(definition),
        "seed": settings.seed,
        "directory": str(directory.parent),
        "project_name": directory.name,
        "overwrite": False,
        # A failed trial (diverged, ...) is recorded and the search goes on, as with Optuna.
        "max_consecutive_failed_trials": max(3, settings.n_trials),
        "parent_run_id": parent_run_id,
        "n_trials": settings.n_trials,
        "deadline": inputs.deadline,
    }
    if algorithm == "bayesian":
        return _tracked(keras_tuner.BayesianOptimization)(
            max_trials=settings.n_trials,
            num_initial_points=settings.n_startup_trials,
            **common,
        )
    return _tracked(keras_tuner.Hyperband)(
        max_epochs=definition.training.max_epochs,
        factor=3,
        # Hyperband alone stops after its brackets; the study's budget decides instead.
        hyperband_iterations=1000,
        **common,
    )


def _best_trial(tuner, study_name: str) -> registry.BestTrial:
    """The best trial whose MLflow run logged its weights."""
    for trial in tuner.oracle.get_best_trials(num_trials=len(tuner.oracle.trials)):
        if trial.status != keras_tuner.engine.trial.TrialStatus.COMPLETED:
            continue
        runs = tracking.child_runs(
            tuner.parent_run_id,
            f"tags.trial_number = '{tracking.trial_tag(trial.trial_id)}' "
            f"and tags.state = 'COMPLETE' and tags.engine = '{ENGINE}'",
        )
        if runs:
            return registry.BestTrial(
                study_name,
                int(trial.trial_id),
                tuner.hypermodel.params(trial.hyperparameters),
                runs[0].info.run_id,
                trial.score,
                engine=ENGINE,
            )
    raise RuntimeError(
        f"Keras Tuner study '{study_name}' has no completed trial to register; see each "
        "trial's fail_reason in the MLflow UI"
    )


def _trial_line(number: int, history: dict, seconds: float, hp) -> str:
    values = history.get(config.OBJECTIVE_METRIC, [])
    value = f"{max(values):.4f}" if values else "-"
    tuner_epochs = hp.values.get("tuner/epochs")
    extra = f" epochs={len(values)}" + (f" of {tuner_epochs}" if tuner_epochs else "")
    params = " ".join(
        f"{k}={space.readable(v)}" for k, v in hp.values.items() if not k.startswith("tuner/")
    )
    return f"trial {number:3d} COMPLETE value={value} {seconds:6.1f}s {params}{extra}"
