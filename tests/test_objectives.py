"""Tuning for deployment: objectives and limits in the study file, costs measured per trial,
the Pareto front, `digitune pareto` and `digitune select`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import use_project, write_study
from digitune import config, loader, model, pareto, space, study, study_file, tracking
from digitune.cli import main
from digitune.engines import optuna_search

EDGE_STUDY = """
[study]
name = "edge-tiny"
n_trials = 4
seed = 3
n_startup_trials = 4

[objectives]
minimize = ["params"]
max_params = 3000

[registry]
model_name = "mnist-edge-tiny"

[training]
max_epochs = 1
precision = "float32"

[space]
learning_rate = 0.005
batch_size = 32
num_conv_blocks = 2
num_filters = { type = "int", low = 4, high = 24, step = 4 }
separable_convolutions = { type = "categorical", choices = [true, false] }
global_average_pooling = true
dense_units = 0
batch_normalization = true
# Augmentation's random ops must not reach the int8 file (the TFLite converter refuses them).
augment_rotation_degrees = 8.0

# Two configurations of known sizes first: 1,514 weights (trained), 8,090 (over the limit).
[[enqueue]]
num_filters = 8
separable_convolutions = false

[[enqueue]]
num_filters = 20
separable_convolutions = false
"""


def _definition(
    tmp_path: Path, objectives_table: str, study_table: str = ""
) -> study_file.StudyDefinition:
    text = (
        f'[study]\nname = "x"\n{study_table}\n[objectives]\n{objectives_table}\n'
        '[space]\nlearning_rate = { type = "float", low = 1e-3, high = 1e-2 }\n'
    )
    path = tmp_path / "x.toml"
    path.write_text(text)
    return study_file.load(path)


def test_objectives_and_limits_are_read_from_the_study_file(tmp_path):
    definition = _definition(
        tmp_path, 'minimize = ["params", "latency_ms"]\nmax_int8_kb = 20\nmax_params = 9000'
    )
    settings = definition.objectives
    assert settings.minimize == ("params", "latency_ms")
    assert settings.limits == {"params": 9000.0, "int8_kb": 20.0}
    assert pareto.directions(settings) == ["maximize", "minimize", "minimize"]
    assert pareto.metric_names(settings) == ["val_accuracy", "params", "latency_ms"]
    # Optuna cannot prune a multi-objective study: the default pruner gives way.
    assert definition.study.pruner == "none"
    # Limits alone keep one objective, and its pruner.
    limited = _definition(tmp_path, "max_latency_ms = 0.5").objectives
    assert pareto.directions(limited) == ["maximize"] and limited.measured
    assert _definition(tmp_path, "max_latency_ms = 0.5").study.pruner == "median"


@pytest.mark.parametrize(
    ("objectives_table", "study_table", "message"),
    [
        ('minimize = ["flops"]', "", "'minimize' must list some of params, int8_kb, latency_ms"),
        ('minimize = ["params", "params"]', "", "once each"),
        ('minimize = "params"', "", "'minimize' must be a list of names"),
        ("max_flops = 100", "", "'max_flops' limits 'flops', which is not an objective"),
        ("max_val_accuracy = 1", "", "val_accuracy is the objective every study maximises"),
        ("maximize = 'val_accuracy'", "", "val_accuracy is always maximised"),
        ("max_params = -5", "", "'max_params' must not be negative"),
        ('minimize = ["params"]', 'pruner = "median"', "Optuna cannot prune a multi-objective"),
    ],
)
def test_bad_objectives_name_the_file_table_and_key(
    tmp_path, objectives_table, study_table, message
):
    with pytest.raises(ValueError) as error:
        _definition(tmp_path, objectives_table, study_table)
    assert str(tmp_path / "x.toml") in str(error.value)
    assert message in str(error.value)


# Hand-checked: (trial, accuracy, params, latency, feasible). Against accuracy and params the
# front is 0 (most accurate), 2 and 4; 1 is beaten by 0 (less accurate, bigger), 3 by 2
# (equally accurate, bigger), 5 is over a limit although it would lead, 6 ties 4 exactly
# (neither dominates the other).
TRIALS = pd.DataFrame(
    [
        (0, 0.990, 9000, 0.50, True),
        (1, 0.985, 9500, 0.40, True),
        (2, 0.980, 3000, 0.45, True),
        (3, 0.980, 4000, 0.30, True),
        (4, 0.950, 500, 0.60, True),
        (5, 0.999, 400, 0.10, False),
        (6, 0.950, 500, 0.70, True),
    ],
    columns=["trial", "val_accuracy", "params", "latency_ms", "feasible"],
)


def test_the_front_matches_a_hand_checked_case_and_optunas_own():
    assert list(pareto.front(TRIALS, ["params"])["trial"]) == [0, 2, 4, 6]
    # With latency too, 1 and 3 are cheaper in latency, so nothing but 6 (beaten by 4) drops.
    assert sorted(pareto.front(TRIALS, ["params", "latency_ms"])["trial"]) == [0, 1, 2, 3, 4]
    # Optuna's own front of the same values, infeasible trial included as a constraint.
    reference = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for row in TRIALS.itertuples():
        reference.add_trial(
            optuna.trial.create_trial(
                values=[row.val_accuracy, row.params, row.latency_ms],
                system_attrs={"constraints:max": 0.0 if row.feasible else 1.0},
            )
        )
    assert sorted(t.number for t in reference.best_trials) == [0, 1, 2, 3, 4]


def test_choose_takes_the_most_accurate_front_model_within_the_limits():
    assert pareto.choose(TRIALS, ["params"], {})["trial"] == 0
    assert pareto.choose(TRIALS, ["params"], {"params": 5000})["trial"] == 2
    assert pareto.choose(TRIALS, ["params"], {"params": 5000, "latency_ms": 0.5})["trial"] == 2
    with pytest.raises(ValueError, match=r"no Pareto-front model has parameters <= 100; .*500"):
        pareto.choose(TRIALS, ["params"], {"params": 100})


@pytest.fixture(scope="module")
def edge_home(tmp_path_factory):
    """A real multi-objective study on the MNIST fixture: costs measured, a limit applied."""
    home = tmp_path_factory.mktemp("edge")
    (home / "studies").mkdir()
    study_file = write_study(home, EDGE_STUDY, "edge-tiny.toml")
    with pytest.MonkeyPatch.context() as patch:
        use_project(patch, home)
        outcome = optuna_search.run(study_file)
        yield home, study_file, outcome
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)


def test_every_trial_records_exact_costs_and_a_limit_stops_training(edge_home):
    home, _, outcome = edge_home
    trials = outcome.study.trials
    assert outcome.study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    assert outcome.study.metric_names == ["val_accuracy", "params"]
    # The enqueued 8,090-weight model is over max_params: not trained, and said so.
    over = trials[1]
    assert over.state == TrialState.PRUNED and over.constraints == {"max_params": 8090 - 3000}
    assert "8,090 parameters" in over.user_attrs["fail_reason"]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    assert completed and trials[0] in completed
    client = mlflow.MlflowClient()
    for trial in completed:
        costs = trial.user_attrs["costs"]
        params = space.params_of(trial)
        # The parameter count against the formula, for the 8-filter network trained first.
        if trial.number == 0:  # 8 then 16 filters, batch norm's 4 vectors each, a softmax
            convolutions = (3 * 3 * 1 * 8 + 8) + (3 * 3 * 8 * 16 + 16)
            assert costs["params"] == convolutions + 4 * (8 + 16) + (16 * 10 + 10) == 1514
        assert costs["params"] == model.build_model(params).count_params()
        assert trial.values == [trial.values[0], costs["params"]]
        assert trial.constraints["max_params"] <= 0
        # The int8 file's size is exact: the file logged to the trial's run.
        run_id = trial.user_attrs[tracking.TRIAL_RUN_ATTR]
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="tflite/model-int8.tflite", dst_path=str(home / "dl")
        )
        assert costs["int8_kb"] == Path(path).stat().st_size / 1000
        assert 0 < costs["latency_ms"] < 1000 and costs["latency_iqr_ms"] >= 0
        # The MLflow UI sorts trials by every objective: each is a metric of the trial's run.
        metrics = client.get_run(run_id).data.metrics
        assert metrics["params"] == costs["params"]
        assert metrics["int8_kb"] == pytest.approx(costs["int8_kb"])
        assert metrics["latency_ms"] == pytest.approx(costs["latency_ms"])
        assert metrics["best_val_accuracy"] == pytest.approx(trial.values[0])


def test_the_parent_run_holds_the_front_figure_and_table(edge_home):
    _, _, outcome = edge_home
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"report/pareto_front.png", "report/pareto_front.csv"} <= names
    logged = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=outcome.parent_run_id, artifact_path="report/pareto_front.csv"
        )
    )
    expected = sorted(t.number for t in outcome.study.best_trials)
    assert sorted(logged["trial"]) == expected


def test_pareto_prints_optunas_front(edge_home, capsys, monkeypatch):
    home, study_file, outcome = edge_home
    use_project(monkeypatch, home)
    assert main(["pareto", "--study", str(study_file)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("|") and "---" not in line]
    shown = [int(row.split("|")[1]) for row in rows[1:]]
    assert sorted(shown) == sorted(t.number for t in outcome.study.best_trials)
    assert "latency ms" in rows[0] and "int8 KB" in rows[0]


def test_select_refuses_when_nothing_fits_and_registers_what_does(edge_home, capsys, monkeypatch):
    home, study_file, outcome = edge_home
    use_project(monkeypatch, home)
    client = tracking.configure(create=True)
    before = client.search_model_versions("name = 'mnist-edge-tiny'")
    assert main(["select", "--study", str(study_file), "--max-params", "10"]) == 1
    assert "no Pareto-front model has parameters <= 10" in capsys.readouterr().err
    assert len(client.search_model_versions("name = 'mnist-edge-tiny'")) == len(before)

    smallest = min(outcome.study.best_trials, key=lambda t: t.values[1])
    limit = smallest.values[1]
    assert main(["select", "--study", str(study_file), "--max-params", f"{limit:.0f}"]) == 0
    version = client.get_model_version_by_alias("mnist-edge-tiny", config.CHALLENGER_ALIAS)
    assert version.tags["trial"] == str(smallest.number)
    costs = smallest.user_attrs["costs"]
    assert version.tags["params"] == f"{costs['params']:.0f}"
    assert version.tags["int8_kb"] == f"{costs['int8_kb']:.1f}"
    assert float(version.tags["served_latency_ms"]) > 0
    files = {a.path for a in client.list_artifacts(version.run_id, "tflite")}
    assert "tflite/model-int8.tflite" in files
    # The chosen model answers as the registered model does everywhere.
    loaded = loader.load(version)
    assert np.asarray(loaded.predict(np.zeros((1, 28, 28, 1), np.float32))).shape == (1, 10)
    assert f"selected trial {smallest.number}" in capsys.readouterr().out


def test_a_study_without_objectives_has_no_front(project, capsys):
    study_path = write_study(
        project,
        '[study]\nname = "plain"\n[space]\nlearning_rate = 0.001\n'
        'num_filters = { type = "int", low = 4, high = 8 }\n',
    )
    definition = study_file.load(study_path)
    optuna_study = study.load_or_create(definition, None)
    optuna_study.add_trial(
        optuna.trial.create_trial(
            value=0.9,
            params={"num_filters": 4},
            distributions={"num_filters": definition.distributions["num_filters"]},
        )
    )
    assert main(["pareto", "--study", str(study_path)]) == 1
    assert "no completed trial that measured its costs" in capsys.readouterr().err


def test_keras_tuner_refuses_a_study_with_objectives(project, capsys):
    study_file = write_study(project, EDGE_STUDY, "edge-tiny.toml")
    assert main(["tune", "--study", str(study_file), "--engine", "keras-tuner"]) == 1
    assert "tuned by the Optuna engine only" in capsys.readouterr().err


def test_nsga2_searches_a_multi_objective_study_within_its_limits(tmp_path):
    definition = _definition(
        tmp_path, 'minimize = ["params"]\nmax_params = 9000', 'sampler = "nsga2"'
    )
    sampler = study.make_sampler(definition.study, seed=0)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)
    # Its selection reads the limits each trial records: a feasible trial beats an infeasible
    # one whatever their values (Optuna's constrained domination).
    reference = optuna.create_study(directions=pareto.directions(definition.objectives))
    for accuracy, params in ((0.99, 12000.0), (0.90, 8000.0)):
        over = pareto.violations({"params": params}, definition.objectives)
        reference.add_trial(
            optuna.trial.create_trial(
                values=[accuracy, params],
                system_attrs={f"constraints:{name}": value for name, value in over.items()},
            )
        )
    assert [t.number for t in reference.best_trials] == [1]
    assert pareto.best_trial(reference).number == 1
