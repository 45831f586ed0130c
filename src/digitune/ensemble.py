"""Ensembles: average the class probabilities of a study's best trials' models.

    digitune ensemble --study studies/mnist-cnn.toml --top 5            the 5 best trials
    digitune ensemble --study studies/mnist-cnn.toml --top 5 --greedy   greedy selection

Members are chosen on the validation set only: the K best trials by validation accuracy, or
greedy forward selection (start from the best trial, add whichever of the 2K best trials
raises the ensemble's validation accuracy most, stop when none does). Each member is rebuilt
in float32 from its trial's logged weights. The ensemble is then evaluated once on the test
set beside its best single member, and registered as a version of `mnist-cnn`: one Keras
model that holds the members and averages their softmax outputs (Keras's `Average` layer),
with the same signature as a single model. It is saved, registered and loaded in safe mode
as any single network is, so `promote`, `serve` and `rollback` treat it like any other and
no pickled code reaches the registry.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import keras
import mlflow
import numpy as np
import optuna
from keras import layers
from optuna.trial import TrialState

from digitune import artifacts, data, evaluate, model, pareto, registry, space, study, tracking

log = logging.getLogger(__name__)

BATCH = 1000


def average_probabilities(members, images: np.ndarray) -> np.ndarray:
    """The mean of the members' softmax outputs, computed (and `data.Pictures` read) a batch
    at a time."""
    total = None  # As many columns as the members have classes.
    for member in members:
        for start in range(0, len(images), BATCH):
            pictures = np.asarray(images[start : start + BATCH], dtype="float32")
            batch = np.asarray(member(pictures, training=False))
            if total is None:
                total = np.zeros((len(images), batch.shape[-1]), dtype="float64")
            total[start : start + BATCH] += batch
    return (total / len(members)).astype("float32")


def averaging_model(members: dict[int, keras.Model]) -> keras.Model:
    """One Keras model of the members (trial number: model): the mean of their softmax
    outputs, in float32 whatever the precision policy."""
    inputs = keras.Input(next(iter(members.values())).input_shape[1:], name="images")
    outputs = []
    for number, member in members.items():
        member.name = f"trial_{number}"  # Names within one Keras model are unique.
        outputs.append(member(inputs))
    mean = layers.Average(dtype="float32", name="mean")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model(inputs, mean, name="ensemble")


@dataclasses.dataclass(frozen=True)
class Outcome:
    members: list[int]
    validation_accuracy: float
    best_member_validation_accuracy: float
    test_accuracy: float
    best_member_test_accuracy: float
    model_version: str
    model_name: str = ""


def select(
    candidates: list[optuna.trial.FrozenTrial],
    validation_probabilities: dict[int, np.ndarray],
    labels: np.ndarray,
    top: int,
    greedy: bool,
) -> list[int]:
    """Trial numbers of the members: the `top` best, or greedy forward selection."""
    ranked = [t.number for t in sorted(candidates, key=pareto.accuracy, reverse=True)]
    if not greedy:
        return ranked[:top]
    chosen = [ranked[0]]
    best = _accuracy(validation_probabilities, chosen, labels)
    while len(chosen) < top:
        scores = {
            number: _accuracy(validation_probabilities, [*chosen, number], labels)
            for number in ranked
            if number not in chosen
        }
        if not scores:
            break
        number = max(scores, key=scores.get)
        if scores[number] <= best:
            break
        chosen.append(number)
        best = scores[number]
    return chosen


def _accuracy(probabilities: dict[int, np.ndarray], members: list[int], labels) -> float:
    mean = np.mean([probabilities[n] for n in members], axis=0)
    return float(np.mean(mean.argmax(axis=1) == labels))


def run(
    study_file: str | Path,
    storage: str | None = None,
    top: int = 5,
    greedy: bool = False,
    model_name: str | None = None,
) -> Outcome:
    """Build, evaluate and register the ensemble of a finished study's best trials, as a
    version of `model_name` (default: the study's own registered model)."""
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    tracking.configure()
    definition, optuna_study = study.load_existing(study_file, storage)
    completed = [
        t
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if tracking.TRIAL_RUN_ATTR in t.user_attrs
    ]
    if not completed:
        raise ValueError(f"study '{optuna_study.study_name}' has no completed trial to ensemble")
    completed.sort(key=pareto.accuracy, reverse=True)
    candidates = completed[: 2 * top] if greedy else completed[:top]

    dataset = data.load(definition.data)
    model_name = model_name or definition.model_name
    training = definition.training
    split = data.split(dataset, training.train_images, training.validation_images)
    models = {
        t.number: artifacts.load_model(space.params_of(t), t.user_attrs[tracking.TRIAL_RUN_ATTR])
        for t in candidates
    }
    validation = {n: average_probabilities([m], split.x_validation) for n, m in models.items()}
    members = select(candidates, validation, split.y_validation, top, greedy)
    log.info(
        "ensemble of trials %s (%s by validation accuracy)",
        ", ".join(map(str, members)),
        "greedy selection" if greedy else f"top {top}",
    )

    test_images, test_labels = data.preprocess(dataset.test_images), dataset.test_labels
    best_member = members[0]
    ensemble_validation = _accuracy(validation, members, split.y_validation)
    ensemble_test = evaluate.from_probabilities(
        average_probabilities([models[n] for n in members], test_images),
        test_labels,
        dataset.class_names,
    )
    best_test = evaluate.from_probabilities(
        average_probabilities([models[best_member]], test_images), test_labels
    )
    parent_run_id = optuna_study.user_attrs.get(tracking.PARENT_RUN_ATTR)
    if parent_run_id is None:
        raise ValueError(
            f"study '{optuna_study.study_name}' has no MLflow parent run; was it run by tune?"
        )
    members_text = ",".join(map(str, members))
    with tracking.ensemble_run(parent_run_id, members):
        mlflow.log_metrics(
            {
                "val_accuracy": ensemble_validation,
                "test_accuracy": ensemble_test.accuracy,
                "best_member_test_accuracy": best_test.accuracy,
            }
        )
        artifacts.log_evaluation(ensemble_test, "test", f"ensemble of {len(members)}, test set")
        description = (
            f"Ensemble of trials {members_text} of study **{optuna_study.study_name}** "
            f"(mean of their softmax outputs; "
            f"{'greedy selection' if greedy else f'the {top} best'} by validation accuracy).\n\n"
            f"- validation accuracy: {ensemble_validation:.4f}\n"
            f"- test accuracy: {ensemble_test.accuracy:.4f} (best single member, trial "
            f"{best_member}: {best_test.accuracy:.4f}; {dataset.name} test set, "
            f"{len(test_labels):,} images)\n"
            f"- data SHA-256: `{dataset.digest}`\n"
        )
        version = registry.register(
            averaging_model({number: models[number] for number in members}),
            model_name=model_name,
            study_name=optuna_study.study_name,
            trial_number="ensemble",
            # The members' builder, if theirs is a network of the user's own: loading the
            # ensemble imports its module (`loader.load`).
            params={**dataset.params, **_builder_param(definition.fixed)},
            validation_accuracy=ensemble_validation,
            test_accuracy=ensemble_test.accuracy,
            test_images=len(test_labels),
            data_sha256=dataset.digest,
            extra_tags={
                **data.version_tags(dataset, definition.data),
                "kind": "ensemble",
                "members": members_text,
                "best_member_test_accuracy": f"{best_test.accuracy:.4f}",
            },
            description=description,
        )
    return Outcome(
        members,
        ensemble_validation,
        _accuracy(validation, [best_member], split.y_validation),
        ensemble_test.accuracy,
        best_test.accuracy,
        str(version.version),
        model_name,
    )


def _builder_param(fixed: dict) -> dict:
    """The study's builder param, or nothing for our own CNN."""
    return {key: fixed[key] for key in (model.BUILDER_PARAM,) if key in fixed}
