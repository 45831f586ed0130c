"""Keras Tuner as the second engine: same space, same MLflow layout, a real search.

The translation test needs no training; the others run real Keras Tuner searches on the
MNIST fixture (a few seconds a trial), which also proves its tensorboard import is satisfied:
without tensorboard every one of these trials would fail.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_STUDY, write_study
from digitune import bench, cli, config, study_file
from digitune.bench import contenders
from digitune.bench import race as racing
from digitune.engines import keras_tuner_search

# Hyperband over 3 epochs with factor 3: three 1-epoch trials, then the best one continued.
HYPERBAND_STUDY = TINY_STUDY.replace("n_trials = 3", "n_trials = 4").replace(
    "max_epochs = 2", "max_epochs = 3"
)
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds")


def test_search_space_translates_every_kind_of_range(project):
    definition = study_file.load(
        write_study(
            project,
            """
[space]
learning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }
dropout_rate = { type = "float", low = 0.0, high = 0.5, step = 0.1 }
num_filters = { type = "int", low = 16, high = 64, step = 16 }
dense_units = { type = "int", low = 32, high = 256, log = true }
kernel_size = { type = "categorical", choices = [3, 5] }
batch_normalization = { type = "categorical", choices = [true, false] }
batch_size = 64
""",
        )
    )
    hp = {
        parameter.name: parameter
        for parameter in keras_tuner_search.hyperparameters(definition).space
    }
    assert list(hp) == list(definition.distributions)  # fixed values are not searched
    assert (hp["learning_rate"].min_value, hp["learning_rate"].max_value) == (1e-4, 1e-2)
    assert hp["learning_rate"].sampling == "log"
    assert (hp["dropout_rate"].step, hp["dropout_rate"].sampling) == (0.1, "linear")
    assert (hp["num_filters"].min_value, hp["num_filters"].max_value) == (16, 64)
    assert hp["num_filters"].step == 16
    assert (hp["dense_units"].sampling, hp["dense_units"].step) == ("log", None)
    assert hp["kernel_size"].values == [3, 5]
    assert hp["batch_normalization"].values == [True, False]

    # Every value Keras Tuner draws lies inside the study's Optuna distribution.
    hyperparameters = keras_tuner_search.hyperparameters(definition)
    rng = np.random.default_rng(0)
    for _ in range(50):
        for name, parameter in hp.items():
            value = parameter.random_sample(int(rng.integers(1 << 30)))
            assert definition.distributions[name]._contains(
                definition.distributions[name].to_internal_repr(value)
            ), (name, value)
    assert hyperparameters.get("num_filters") == 16  # defaults to the range's low end


@pytest.mark.slow
def test_hyperband_search_is_tracked_like_optuna_and_registered(project):
    study_file = write_study(project, HYPERBAND_STUDY)
    outcome = keras_tuner_search.run(study_file)
    assert outcome.study_name == "tiny-keras-tuner-hyperband"
    assert outcome.trials == 4

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tiny")  # the study's experiment, as Optuna's
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("digitune.role") == "study"]
    assert parent.info.run_name == "tiny keras-tuner hyperband"
    assert parent.data.tags["engine"] == "keras-tuner"
    assert parent.data.tags["algorithm"] == "hyperband"
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(outcome.test_accuracy)
    assert parent.data.params["study.name"] == "tiny"

    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == {"trial-0000", "trial-0001", "trial-0002", "trial-0003"}
    for name, child in children.items():
        assert child.info.status == "FINISHED"
        assert child.data.tags["engine"] == "keras-tuner"
        assert child.data.tags["state"] == "COMPLETE", child.data.tags.get("fail_reason")
        assert child.data.params["batch_size"] == "64"  # fixed values are logged too
        for metric in EPOCH_METRICS:
            assert client.get_metric_history(child.info.run_id, metric), (name, metric)
        assert 0 < child.data.metrics["tracking_seconds"] < child.data.metrics["trial_seconds"]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"val_confusion_matrix.png", "val_confusion_matrix.json", "weights"} <= artifacts

    # Successive halving: the fourth trial continues the best first-round trial from its
    # checkpoint, and its epochs are logged at the steps after the ones it started from.
    continued = children["trial-0003"].data.tags
    assert continued["hyperband_epochs"] == "3"
    assert continued["hyperband_initial_epoch"] == "1"
    first_round = {n: children[f"trial-{n:04d}"].data.metrics["val_accuracy"] for n in range(3)}
    assert int(continued["hyperband_trial_id"]) == max(first_round, key=first_round.get)
    # Steps count training images seen: its epochs 1 and 2 end at 2 and 3 passes over the
    # fixture's 1,500 tuning images.
    steps = client.get_metric_history(children["trial-0003"].info.run_id, "val_accuracy")
    assert sorted(m.step for m in steps) == [3000, 4500]

    # The best trial's model, rebuilt from its logged weights, is the registered challenger.
    version = client.get_model_version_by_alias(config.REGISTERED_MODEL_NAME, "challenger")
    assert str(version.version) == outcome.model_version
    assert version.tags["engine"] == "keras-tuner"
    assert version.tags["study"] == "tiny-keras-tuner-hyperband"
    assert version.tags["trial"] == str(outcome.best.number)
    best_value = max(
        max(m.value for m in client.get_metric_history(c.info.run_id, "val_accuracy"))
        for c in children.values()
    )
    assert outcome.best.validation_accuracy == pytest.approx(best_value)

    # Running it again resumes: Keras Tuner's state and the same parent run; the four trials
    # run so far are not run again, only a fifth one is.
    again = keras_tuner_search.run(study_file, n_trials=5)
    assert again.trials == 5 and again.parent_run_id == parent.info.run_id
    after = [
        (r.info.run_name, r.info.run_id)
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert sorted(name for name, _ in after) == [f"trial-{n:04d}" for n in range(5)]
    assert {name: run_id for name, run_id in after if name != "trial-0004"} == {
        name: child.info.run_id for name, child in children.items()
    }


@pytest.mark.slow
def test_bayesian_optimization_is_selectable(project, capsys):
    study_file = write_study(
        project,
        TINY_STUDY.replace("n_trials = 3", "n_trials = 2")
        .replace("max_epochs = 2", "max_epochs = 1")
        .replace('precision = "float32"', 'precision = "mixed_bfloat16"'),
    )
    assert (
        cli.main(
            [
                "tune",
                "--study",
                str(study_file),
                "--engine",
                "keras-tuner",
                "--algorithm",
                "bayesian",
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert "registered mnist-cnn version 1" in printed.out
    # digitune's own line says it once; MLflow's registration prints stay out.
    assert "Successfully registered" not in printed.err + printed.out
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("digitune.role") == "study"]
    assert parent.data.tags["algorithm"] == "bayesian"
    assert len(runs) == 3
    # Keras Tuner clears the Keras session (and with it the dtype policy) before each build;
    # every trial still trains in the study's precision.
    trials = [r for r in runs if r.data.tags.get("digitune.role") != "study"]
    assert [r.data.tags["precision"] for r in trials] == ["mixed_bfloat16"] * 2


def test_optuna_only_options_are_refused_for_keras_tuner(project, capsys):
    study_file = write_study(project, TINY_STUDY)
    code = cli.main(
        ["tune", "--study", str(study_file), "--engine", "keras-tuner", "--workers", "2"]
    )
    assert code == 1
    assert "Keras Tuner runs one worker" in capsys.readouterr().err


@pytest.mark.slow
def test_tuning_race_writes_its_tables_and_plot(project):
    write_study(
        project, HYPERBAND_STUDY.replace('name = "tiny"', 'name = "mnist-cnn"'), "mnist-cnn.toml"
    )
    results = racing.tuning_race(budget_minutes=0.15, seeds=1)
    race, runs, overhead, curves = results.summary, results.runs, results.overhead, results.curves

    assert list(race["contender"]) == [contender.name for contender in racing.CONTENDERS]
    assert list(runs["seed"]) == [7, 7, 7]  # the study file's seed
    assert (runs["trials_started"] >= 1).all()
    assert (runs["trials_started"] == runs[["completed", "pruned", "failed"]].sum(axis=1)).all()
    assert (
        (runs["configurations"] >= 1) & (runs["configurations"] <= runs["trials_started"])
    ).all()
    assert race["test_accuracy_of_best"].between(0.5, 1.0).all()
    # The best-so-far curve never goes down and ends at the table's best.
    for (contender, _seed), curve in curves.groupby(["contender", "seed"]):
        assert np.all(np.diff(curve["best_val_accuracy"]) >= 0)
        best = race.set_index("contender").loc[contender, "best_val_accuracy"]
        assert curve["best_val_accuracy"].iloc[-1] == pytest.approx(best, abs=1e-4)
    assert (overhead["tracking_percent"] > 0).all() and (overhead["tracking_percent"] < 100).all()

    markdown = bench.write_results("tuning_race", race, racing.plot_race(curves))
    assert markdown.read_text().count("\n| ") == 1 + len(race)
    assert (markdown.parent / "tuning_race.png").stat().st_size > 10_000
    lines = racing.compare(race, "Keras Tuner Hyperband").splitlines()
    assert lines[0] == "medians of 1 seed(s), ratios to Keras Tuner Hyperband's:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == list(race["contender"])
    assert all("99.0% " in line and "99.3% " in line for line in lines[1:])
    # Each contender's parent run holds the race's plot.
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(racing.RACE_EXPERIMENT)
    parents = client.search_runs(
        [experiment.experiment_id], "tags.`digitune.role` = 'study'", max_results=10
    )
    assert len(parents) == 3
    for parent in parents:
        assert [a.path for a in client.list_artifacts(parent.info.run_id, "race")] == [
            "race/best_so_far.png"
        ]
    # Nothing raced was registered.
    assert not mlflow.MlflowClient().search_registered_models()


def test_hyperband_in_the_race_trains_whole_passes_of_the_study_s_length():
    default = study_file.load(config.default_study_file()).training
    hyperband = keras_tuner_search.whole_passes(default)
    # The default study's epochs are quarter passes; Hyperband gets the same images a trial.
    assert default.epoch_images and default.epoch_images < keras_tuner_search.MNIST_TUNING_IMAGES
    assert hyperband.epoch_images == 0
    assert hyperband.max_epochs * keras_tuner_search.MNIST_TUNING_IMAGES == (
        default.max_epochs * default.epoch_images
    )
    whole = config.TrainingSettings(max_epochs=6)
    assert keras_tuner_search.whole_passes(whole) == whole
    subset = config.TrainingSettings(max_epochs=8, epoch_images=2000, train_images=4000)
    assert keras_tuner_search.whole_passes(subset).max_epochs == 4


def test_the_ablation_takes_the_default_study_s_levers_apart():
    default = study_file.load(config.default_study_file())
    cells = [
        (
            cell.pruner or default.study.pruner,
            "whole passes" if cell.training(default.training).epoch_images == 0 else "quarters",
        )
        for cell in contenders.ABLATION
    ]
    # The default study's pruner against Optuna's successive halving, both on quarter passes,
    # and each kind of pruner on quarter and on whole passes.
    assert cells[:2] == [
        ("rejudging_successive_halving", "quarters"),
        ("successive_halving", "quarters"),
    ]
    assert set(cells[2:]) == {
        (pruner, epochs)
        for pruner in ("rejudging_successive_halving", "median")
        for epochs in ("whole passes", "quarters")
    } - {("rejudging_successive_halving", "quarters")}
    # Every cell trains the same images in a full trial: 10 passes of the 50,000.
    for cell in contenders.ABLATION:
        training = cell.training(default.training)
        images = training.epoch_images or keras_tuner_search.MNIST_TUNING_IMAGES
        assert training.max_epochs * images == 500_000
    # One store per contender and seed: their names differ.
    everyone = {*contenders.CONTENDERS, *contenders.ABLATION}
    assert len({cell.slug for cell in everyone}) == len(everyone)
    assert contenders.ABLATION[4].slug == "median-pruner-whole-passes"
    # `digitune bench --contenders` picks cells by slug, in their declared order.
    picked = contenders.chosen(contenders.ABLATION, ["median-pruner-whole-passes", "default-study"])
    assert picked == (contenders.ABLATION[0], contenders.ABLATION[4])
    with pytest.raises(ValueError, match="no contender hyperband here; choose from default-study"):
        contenders.chosen(contenders.ABLATION, ["hyperband"])


def test_race_summary_takes_medians_and_ranges_over_seeds():
    nan = float("nan")
    runs = pd.DataFrame(
        {
            "contender": ["a", "a", "a", "b"],
            "seed": [0, 1, 2, 0],
            "configurations": [10, 20, 16, 5],
            "minutes_to_0.990": [1.0, nan, 3.0, 2.5],
            "minutes_to_0.993": [nan, nan, 2.0, nan],
            "best_val_accuracy": [0.99, 0.995, 0.993, 0.98],
            "test_accuracy_of_best": [0.991, 0.994, 0.992, 0.979],
        }
    )
    summary = racing.summarise(runs).set_index("contender")
    a, b = summary.loc["a"], summary.loc["b"]
    assert (a["seeds"], b["seeds"]) == (3, 1)
    assert (a["configurations"], a["configurations_range"]) == (16, "10-20")
    # A seed that never reached the target counts as slower than every seed that did.
    assert (a["minutes_to_0.990"], a["minutes_to_0.990_range"]) == (3.0, "1-not reached")
    assert np.isnan(a["minutes_to_0.993"]) and a["minutes_to_0.993_range"] == "2-not reached"
    assert a["best_val_accuracy"] == 0.993 and a["test_accuracy_of_best"] == 0.992
    assert (b["minutes_to_0.990"], b["minutes_to_0.990_range"]) == (2.5, "2.5-2.5")
    # Compared on the medians, with ratios to the reference's.
    lines = racing.compare(racing.summarise(runs), reference="b").splitlines()
    assert lines[0] == "medians of 1 seed(s), ratios to b's:"
    assert lines[1] == (
        "  a: 16 configurations (3.20x), 99.0% in 3.00 min (1.20x), 99.3% not reached, "
        "best validation 0.9930, test of its best 0.9920"
    )


def test_trials_not_carried_to_the_next_round_count_as_dropped():
    first_round = [
        {"trial_number": str(n), "state": "COMPLETE", "hyperband_epochs": "3"} for n in range(3)
    ]
    continued = {
        "trial_number": "3",
        "state": "COMPLETE",
        "hyperband_epochs": "8",
        "hyperband_trial_id": "1",
    }
    full_length = {"trial_number": "4", "state": "COMPLETE", "hyperband_epochs": "8"}
    failed = {"trial_number": "5", "state": "FAIL", "hyperband_epochs": "3"}
    tags = [*first_round, continued, full_length, failed]
    assert keras_tuner_search.dropped_by_successive_halving(tags, max_epochs=8) == {0, 2}
    # Keras Tuner's id of the continued trial is tagged as digitune writes trial numbers.
    assert (
        keras_tuner_search._hyperband_tags({"tuner/trial_id": "01"})["hyperband_trial_id"] == "0001"
    )


def test_a_missing_extra_says_which_to_install(project, monkeypatch, capsys):
    # Keras Tuner is an optional part (`digitune[keras-tuner]`); without it the command says
    # how to get it instead of printing an import traceback.
    import sys

    import digitune.engines

    monkeypatch.setitem(sys.modules, "keras_tuner", None)
    monkeypatch.delitem(sys.modules, "digitune.engines.keras_tuner_search", raising=False)
    monkeypatch.delattr(digitune.engines, "keras_tuner_search", raising=False)
    study_file = write_study(project, TINY_STUDY)
    assert cli.main(["tune", "--engine", "keras-tuner", "--study", str(study_file)]) == 1
    assert "pip install 'digitune[keras-tuner]'" in capsys.readouterr().err


def test_a_when_becomes_keras_tuner_s_parent_condition(tmp_path):
    """A conditional hyperparameter is Keras Tuner's `parent_name`/`parent_values`: inactive,
    and out of the trial's params, where the condition fails. Two conditions at once are
    refused with the engine to use instead."""
    path = tmp_path / "conditional.toml"
    path.write_text(
        '[space]\noptimizer = { type = "categorical", choices = ["adam", "adamw"] }\n'
        'weight_decay = { type = "float", low = 0, high = 0.01, when = { optimizer = "adamw" } }\n'
    )
    definition = study_file.load(path)
    hp = keras_tuner_search.hyperparameters(definition)
    hypermodel = keras_tuner_search.CnnHyperModel(definition, split=None)
    assert hypermodel.params(hp) == {"optimizer": "adam"}
    # As the oracle fills in an AdamW trial.
    hp.values.update({"optimizer": "adamw", "weight_decay": 0.005})
    assert hypermodel.params(hp) == {"optimizer": "adamw", "weight_decay": 0.005}

    path.write_text(
        '[space]\noptimizer = { type = "categorical", choices = ["adam", "adamw"] }\n'
        'batch_size = { type = "categorical", choices = [64, 128] }\nweight_decay = { type = '
        '"float", low = 0, high = 0.01, when = { optimizer = "adamw", batch_size = 64 } }\n'
    )
    with pytest.raises(ValueError, match="conditions a hyperparameter on one other only"):
        keras_tuner_search.hyperparameters(study_file.load(path))
