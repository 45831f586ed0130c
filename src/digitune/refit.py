"""Refit: retrain a study's best configuration on all 60,000 training images.

Trials train on five sixths of the training file and keep the last sixth to compare
configurations. Once the configuration is chosen, those 10,000 images can train too: the
refit model trains on all of them for the epoch count at which the best trial peaked (its
best validation epoch), with the same seed, trainer and precision, and is registered beside
the trial's own model as a version tagged `kind=refit`, taking the `challenger` alias. Both
test accuracies are reported; the test set only evaluates, it chooses nothing.

`lr_schedule = "plateau"` needs validation accuracy, which a refit does not have, so a
refit of such a configuration keeps its learning rate constant (it says so).
"""

from __future__ import annotations

import dataclasses
import logging

import keras
import mlflow
import numpy as np
import optuna

from digitune import (
    artifacts,
    data,
    evaluate,
    model,
    pareto,
    registry,
    space,
    study_file,
    tracking,
    trainer,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Refit:
    version: str
    epochs: int
    test_accuracy: float
    trial_test_accuracy: float


def best_epochs(trial: optuna.trial.FrozenTrial) -> int:
    """How many epochs the trial needed to reach its best validation accuracy."""
    if not trial.intermediate_values:
        return int(trial.user_attrs.get("epochs", 1))
    values = trial.intermediate_values
    best_step = max(sorted(values), key=lambda step: values[step])
    return best_step + 1


def run(
    study: optuna.Study,
    definition: study_file.StudyDefinition,
    dataset: data.Dataset,
    parent_run_id: str,
    trial_test_accuracy: float,
) -> Refit:
    """Retrain the study's best trial on all training images and register the model."""
    best = pareto.best_trial(study)
    model_name = definition.model_name
    existing = registry.find_version(
        study.study_name, best.number, kind="refit", model_name=model_name
    )
    if existing is not None:
        log.info("refit: trial %d is already refitted as version %s", best.number, existing.version)
        return Refit(
            str(existing.version),
            int(existing.tags.get("epochs", 0)),
            float(existing.tags["test_accuracy"]),
            trial_test_accuracy,
        )
    params = space.params_of(best)
    if params.get("lr_schedule") == "plateau":
        log.info("refit: lr_schedule 'plateau' needs validation data; refitting at a constant rate")
        params = {**params, "lr_schedule": "constant"}
    epochs = best_epochs(best)
    everything = data.Split(
        x_train=data.preprocess(dataset.train_images),
        y_train=dataset.train_labels.astype("int64"),
        x_validation=np.zeros((0, *dataset.image_shape), "float32"),
        y_validation=np.zeros((0,), "int64"),
    )
    log.info(
        "refit: trial %d's configuration on all %s training images for %d epochs",
        best.number,
        f"{len(everything.y_train):,}",
        epochs,
    )
    trainer.fresh_session(definition.training.precision, definition.study.seed + best.number)
    with tracking.refit_run(parent_run_id, best.number) as refit_run:
        mlflow.log_params(params)
        cnn = model.build_model(params)
        history = trainer.fit(
            cnn,
            params,
            everything,
            epochs,
            [
                trainer.StopOnRequest(),
                keras.callbacks.TerminateOnNaN(),
                trainer.EpochTimes(),
                tracking.EpochLogger(len(everything.y_train)),
            ],
            settings=definition.training,
        ).history
        trainer.check_finite(history, params)
        artifacts.log_weights(cnn)
        float32_model = artifacts.load_model(params, refit_run.info.run_id)
        test = evaluate.evaluate(
            float32_model, data.preprocess(dataset.test_images), dataset.test_labels
        )
        artifacts.log_evaluation(
            test,
            "test",
            f"refit of trial {best.number}, {dataset.name} test set",
            dataset.class_names,
        )
        mlflow.log_metrics(
            {"test_accuracy": test.accuracy, "trial_test_accuracy": trial_test_accuracy}
        )
        version = registry.register(
            float32_model,
            model_name=model_name,
            study_name=study.study_name,
            trial_number=best.number,
            params=params,
            validation_accuracy=pareto.accuracy(best),
            test_accuracy=test.accuracy,
            test_images=len(dataset.test_labels),
            data_sha256=dataset.digest,
            extra_tags={
                **data.version_tags(dataset, definition.data),
                "kind": "refit",
                "epochs": str(epochs),
                "train_images": str(len(everything.y_train)),
                "trial_test_accuracy": f"{trial_test_accuracy:.4f}",
            },
        )
    return Refit(str(version.version), epochs, test.accuracy, trial_test_accuracy)
