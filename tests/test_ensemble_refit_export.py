"""Refit, ensembles and TFLite export, through the real registry and stores."""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest

from conftest import TINY_STUDY, register_trained_cnn, write_study
from digitune import (
    artifacts,
    cli,
    config,
    data,
    deployment,
    ensemble,
    loader,
    registry,
    space,
    tracking,
)
from digitune.data import mnist
from digitune.engines import optuna_search

pytestmark = pytest.mark.slow

# Four trials, so that an ensemble has members to choose from.
STUDY = TINY_STUDY.replace("n_trials = 3", "n_trials = 4").replace(
    "pruner_startup_trials = 1", "pruner_startup_trials = 4"
)


def _member_predictions(study: optuna.Study, numbers, images):
    trials = {t.number: t for t in study.trials}
    return [
        artifacts.load_model(
            space.params_of(trials[n]), trials[n].user_attrs[tracking.TRIAL_RUN_ATTR]
        ).predict(images, verbose=0)
        for n in numbers
    ]


def test_refit_then_ensembles_through_the_registry(project, capsys):
    study_file = write_study(project, STUDY)
    outcome = optuna_search.run(study_file, refit_best=True)
    client = mlflow.MlflowClient()
    digits = mnist.load()

    # Refit: a second version, tagged refit, trained on all 1,800 fixture training images for
    # the epochs at which the best trial peaked; it is now the challenger.
    refit = outcome.refit
    trial_version = registry.find_version("tiny", outcome.best.number)
    refit_version = client.get_model_version(config.REGISTERED_MODEL_NAME, refit.version)
    assert trial_version is not None and str(trial_version.version) != str(refit_version.version)
    assert refit_version.tags["kind"] == "refit"
    assert refit_version.tags["train_images"] == str(len(digits.train_labels)) == "1800"
    best = outcome.study.trials[outcome.best.number]
    peak = max(best.intermediate_values, key=best.intermediate_values.get) + 1
    assert refit.epochs == peak == int(refit_version.tags["epochs"])
    assert refit_version.aliases == [config.CHALLENGER_ALIAS]
    assert float(refit_version.tags["trial_test_accuracy"]) == pytest.approx(
        outcome.test_accuracy, abs=1e-4
    )
    refit_model = loader.load(refit_version)
    test_images = data.preprocess(digits.test_images)
    accuracy = np.mean(refit_model.predict(test_images).argmax(1) == digits.test_labels)
    assert accuracy == pytest.approx(refit.test_accuracy, abs=1e-6)

    study = optuna.load_study(study_name="tiny", storage=config.default_storage("tiny"))
    completed = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.value,
        reverse=True,
    )
    assert len(completed) >= 2

    # An ensemble of one model equals that model.
    one = ensemble.run(study_file, top=1)
    assert one.members == [completed[0].number]
    loaded = mlflow.pyfunc.load_model(f"models:/{config.REGISTERED_MODEL_NAME}@challenger")
    (alone,) = _member_predictions(study, one.members, test_images)
    np.testing.assert_allclose(loaded.predict(test_images), alone, atol=1e-5)
    # Its test accuracy, counted here from the member's own predictions.
    alone_accuracy = np.mean(alone.argmax(1) == digits.test_labels)
    assert one.test_accuracy == pytest.approx(alone_accuracy, abs=1e-6)
    assert one.best_member_test_accuracy == pytest.approx(alone_accuracy, abs=1e-6)

    # Two members: the registered pyfunc averages exactly its members' probabilities.
    two = ensemble.run(study_file, top=2)
    assert two.members == [t.number for t in completed[:2]]
    version = client.get_model_version_by_alias(config.REGISTERED_MODEL_NAME, "challenger")
    assert str(version.version) == two.model_version
    assert version.tags["kind"] == "ensemble" and version.tags["members"] == ",".join(
        map(str, two.members)
    )
    loaded = loader.load(version)
    expected = np.mean(_member_predictions(study, two.members, test_images), axis=0)
    probabilities = loaded.predict(test_images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert np.mean(probabilities.argmax(1) == digits.test_labels) == pytest.approx(
        two.test_accuracy
    )
    assert float(version.tags["test_accuracy"]) == pytest.approx(two.test_accuracy, abs=1e-4)

    # Promotion treats the ensemble like any model.
    capsys.readouterr()
    assert cli.main(["promote"]) == 0
    assert "version " + two.model_version in capsys.readouterr().out
    champion = client.get_model_version_by_alias(config.REGISTERED_MODEL_NAME, "champion")
    assert str(champion.version) == two.model_version

    # ... but TFLite exports one network, and says so.
    assert cli.main(["export"]) == 1
    assert "is an ensemble" in capsys.readouterr().err


def test_greedy_selection_stops_when_no_member_helps():
    labels = np.array([0, 1, 2, 3])
    confident = np.eye(10)[[0, 1, 2, 9]]  # 3 of 4 right
    helpful = np.eye(10)[[0, 1, 2, 3]] * [[1], [1], [1], [2]]  # outweighs it where it errs
    useless = np.eye(10)[[9, 9, 9, 9]] * 0.1
    trials = [
        optuna.trial.create_trial(value=v, params={}, distributions={}) for v in (0.75, 0.25, 0.0)
    ]
    for number, trial in enumerate(trials):
        trial.number = number
    probabilities = {0: confident, 1: helpful, 2: useless}
    assert ensemble.select(trials, probabilities, labels, top=3, greedy=False) == [0, 1, 2]
    assert ensemble.select(trials, probabilities, labels, top=3, greedy=True) == [0, 1]


def test_tflite_int8_agrees_with_keras_and_is_small(project):
    params = {"num_conv_blocks": 2, "num_filters": 16, "dense_units": 64}
    cnn, version = register_trained_cnn(params, epochs=6, study_name="export")
    client = mlflow.MlflowClient()

    table = deployment.export().set_index("format")
    keras_accuracy = table.loc["Keras SavedModel (float32)", "test_accuracy"]
    assert table.loc["TFLite float32", "test_accuracy"] == pytest.approx(keras_accuracy, abs=1e-9)
    assert table.loc["TFLite int8", "size_ratio_to_float32"] >= 3
    assert table.loc["TFLite float16", "size_ratio_to_float32"] >= 1.8

    # The int8 model's predictions agree with the Keras model's on most of the fixture.
    digits = mnist.load()
    images = data.preprocess(digits.test_images)
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "tflite")}
    assert {
        "tflite/mnist-cnn-v1-float16.tflite",
        "tflite/mnist-cnn-v1-int8.tflite",
        "tflite/tflite.md",
    } <= artifacts
    int8_file = mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path="tflite/mnist-cnn-v1-int8.tflite"
    )
    with open(int8_file, "rb") as handle:
        int8 = deployment.Interpreter(handle.read(), batch=100)
    agreement = np.mean(int8.predict(images).argmax(1) == cnn.predict(images, verbose=0).argmax(1))
    assert agreement >= 0.97
    tags = client.get_model_version(config.REGISTERED_MODEL_NAME, "1").tags
    assert int(tags["tflite_int8_bytes"]) == table.loc["TFLite int8", "bytes"]


def test_an_ensemble_averages_as_many_classes_as_its_members_have():
    """Three classes (a folder dataset's), over more images than one batch: the mean of the
    members' own predictions, image by image."""
    import keras

    from digitune import model

    images = np.random.default_rng(0).random((ensemble.BATCH + 7, 28, 28, 1), dtype=np.float32)
    members = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        members.append(model.build_model({"num_filters": 4, "dense_units": 8, "num_classes": 3}))
    averaged = ensemble.average_probabilities(members, images)
    expected = np.mean([m.predict(images, verbose=0) for m in members], axis=0)
    assert averaged.shape == (len(images), 3)
    np.testing.assert_allclose(averaged, expected, atol=1e-5)
