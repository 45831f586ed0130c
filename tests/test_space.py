"""Study files: the shipped ones load, and every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from digitune import space, study_file

STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("name", ["mnist-cnn.toml", "quick.toml"])
def test_shipped_study_files_load(name):
    definition = study_file.load(STUDIES / name)
    assert definition.study.name == name.removesuffix(".toml")
    assert definition.distributions


def test_default_study_samples_what_users_tune():
    definition = study_file.load(STUDIES / "mnist-cnn.toml")
    sampled = set(definition.distributions)
    assert {
        "learning_rate",
        "batch_size",
        "num_conv_blocks",
        "num_filters",
        "dense_units",
        "dropout_rate",
    } <= sampled
    assert definition.distributions["learning_rate"].log
    assert definition.study.sampler == "tpe"
    # Judged from the first trial on, every quarter pass (12,500 of the 50,000 images).
    assert definition.study.pruner == "rejudging_successive_halving"
    assert definition.training.epoch_images * 4 == 50_000


def test_suggest_gives_a_plain_dict_with_fixed_values(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[space]\nlearning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }\n'
        'kernel_size = { type = "categorical", choices = [3, 5] }\n'
        'num_filters = { type = "int", low = 8, high = 32, step = 8 }\n'
        "dense_units = 64\n"
    )
    definition = study_file.load(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    params = space.suggest(trial, definition)
    assert params["dense_units"] == 64
    assert 1e-4 <= params["learning_rate"] <= 1e-2
    assert params["kernel_size"] in (3, 5)
    assert params["num_filters"] in (8, 16, 24, 32)
    study.tell(trial, 0.5)
    assert space.params_of(study.trials[0]) == params


_CONDITIONAL = """[space]
optimizer = { type = "categorical", choices = ["adam", "adamw"] }
weight_decay = { type = "float", low = 1e-5, high = 0.01, when = { optimizer = "adamw" } }
num_conv_blocks = { type = "int", low = 1, high = 3 }
filter_growth = { type = "float", low = 1.25, high = 2.0, when = { num_conv_blocks = [2, 3] } }
"""


def test_a_conditional_hyperparameter_is_sampled_only_where_its_condition_holds(tmp_path):
    """Define-by-run: weight_decay in AdamW trials only, filter_growth where there is more
    than one block; elsewhere the trial has no such param and the model takes its default."""
    path = tmp_path / "conditional.toml"
    path.write_text(_CONDITIONAL)
    definition = study_file.load(path)
    assert definition.conditions == {
        "weight_decay": {"optimizer": ("adamw",)},
        "filter_growth": {"num_conv_blocks": (2, 3)},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        params = space.suggest(trial, definition)
        study.tell(trial, 0.5)
        assert ("weight_decay" in params) == (params["optimizer"] == "adamw")
        assert ("filter_growth" in params) == (params["num_conv_blocks"] >= 2)
        assert space.params_of(study.trials[-1]) == params
        seen.add((params["optimizer"], params["num_conv_blocks"] >= 2))
    assert seen == {("adam", False), ("adam", True), ("adamw", False), ("adamw", True)}
    # The shipped full study searches AdamW's weight decay for AdamW trials alone.
    full = study_file.load(STUDIES / "full.toml")
    assert full.conditions == {"weight_decay": {"optimizer": ("adamw",)}}
    assert full.enqueued[0]["optimizer"] == "adamw" and "weight_decay" in full.enqueued[0]


_SPACE = """[space]
num_filters = { type = "int", low = 8, high = 16, step = 8 }
kernel_size = { type = "categorical", choices = [5, 7] }
dense_units = 32
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[study\nname = 1", "not a valid TOML file"),
        ("[studdy]\nname = 'x'", "unknown table"),
        ("[study]\nn_trails = 5", r"\[study\]: unknown key 'n_trails'"),
        ("[study]\nn_trials = 'five'", r"\[study\]: 'n_trials' must be an integer"),
        ("[study]\npruner = 'sometimes'", r"'pruner' must be one of median, hyperband, none"),
        # The objective is val_accuracy, always maximised; "minimize" used to be accepted
        # and quietly minimised accuracy.
        ("[study]\ndirection = 'minimize'", r"'direction' is not a setting: every study maxim"),
        ("[study]\nworkers = 0", r"\[study\]: 'workers' must be 1 to 64 worker processes on one"),
        ("[training]\nmax_epochs = 0", r"\[training\]: 'max_epochs' must be at least 1"),
        ("[training]\nmax_epochs = -3", r"'max_epochs' must not be negative"),
        ("[space]\nlearning_rat = 0.1", r"\[space\] 'learning_rat': unknown hyperparameter"),
        (
            "[space]\ndropout_rate = { type = 'float', low = 0.5, high = 0.1 }",
            r"'dropout_rate': 'low' \(0.5\) is greater than 'high' \(0.1\)",
        ),
        (
            "[space]\nlearning_rate = { type = 'float', low = 0.0, high = 0.1, log = true }",
            r"'learning_rate': a log range needs 'low' > 0",
        ),
        ("[space]\nnum_filters = { type = 'int', low = 8 }", r"'num_filters': 'high' is missing"),
        ("[space]\nnum_filters = { type = 'integer', low = 8, high = 9 }", r"'type' must be"),
        ("[space]\nkernel_size = { type = 'categorical', choices = [] }", "non-empty list"),
        ("[space]\nkernel_size = { type = 'categorical', choices = [3], low = 1 }", "unknown key"),
        ("[space]\ndense_units = 64", "nothing to search"),
        (
            f"{_SPACE}[[enqueue]]\nnum_filters = 24",
            r"\[\[enqueue\]\] #1 'num_filters': 24 is outside its \[space\] range",
        ),
        (f"{_SPACE}[[enqueue]]\nnum_filters = 12", r"#1 'num_filters': 12 is outside"),
        (f"{_SPACE}[[enqueue]]\nkernel_size = 3", r"#1 'kernel_size': 3 is outside"),
        (f"{_SPACE}[[enqueue]]\nkernel_size = 5.0", r"#1 'kernel_size': 5.0 is outside"),
        (f"{_SPACE}[[enqueue]]\n[[enqueue]]\ndense_units = 32", r"#2 'dense_units': fixed"),
        (f"{_SPACE}[[enqueue]]\nlearning_rate = 0.1", r"'learning_rate': not a sampled"),
        (f"enqueue = 5\n{_SPACE}", r"\[\[enqueue\]\]: expected an array of tables"),
        # Fixed values, choices and range ends are held to what the model takes.
        (
            "[space]\noptimizer = 'adamm'",
            r"\[space\] 'optimizer': must be one of adam, adamw, sgd, rmsprop, got 'adamm'",
        ),
        ("[space]\nkernel_size = 4.5", r"'kernel_size': must be an integer from 1 to 28, got 4.5"),
        (
            "[space]\nbatch_normalization = 1",
            r"'batch_normalization': must be true or false, got 1",
        ),
        (
            "[space]\noptimizer = { type = 'categorical', choices = ['adam', 'adamm'] }",
            r"'optimizer' choice 'adamm': must be one of",
        ),
        (
            "[space]\ndropout_rate = { type = 'float', low = 0.1, high = 1.5 }",
            r"'dropout_rate' 'high': must be a number in \[0, 1\), got 1.5",
        ),
        ("[space]\nnum_filters = { type = 'float', low = 8, high = 16 }", "takes integers"),
        ("[space]\noptimizer = { type = 'int', low = 1, high = 2 }", "not a range of numbers"),
        (
            "[space]\nnum_filters = { type = 'int', low = 8, high = 32, step = 1.5 }",
            r"'num_filters': an int range takes a whole 'step', got 1.5",
        ),
        ("[space]\nnum_filters = { type = 'int', low = 8, high = 32, step = true }", "'step' must"),
        # Heartbeats: a dead worker is one silent for longer than a heartbeat.
        ("[study]\nheartbeat_seconds = 0", r"'heartbeat_seconds' must be at least 1, got 0"),
        (
            "[study]\nheartbeat_seconds = 30\nheartbeat_grace_seconds = 30",
            r"'heartbeat_grace_seconds' \(30\) must be longer than 'heartbeat_seconds' \(30\)",
        ),
        # A study's name becomes a file under studies/ and a value in registry queries.
        ("[study]\nname = '../../etc/evil'", r"study name '../../etc/evil' is not allowed"),
        ("[study]\nname = \"x' OR tags.study_name != '\"", "is not allowed"),
        ("[study]\nname = ''", "study name '' is not allowed"),
        ("[study]\nname = 'a..b'", "study name 'a..b' is not allowed"),
        # Values that are numbers of the right type, but that no study can run with.
        ("[study]\ntimeout_minutes = inf", r"'timeout_minutes' must be a finite number, got inf"),
        ("[study]\ntimeout_minutes = nan", r"'timeout_minutes' must be a finite number, got nan"),
        ("[objectives]\nmax_params = nan", r"'max_params' must be a finite number, got nan"),
        ("[study]\nworkers = 100000", r"'workers' must be 1 to 64 worker processes"),
        ("[training]\nsteps_per_execution = 0", r"'steps_per_execution' must be at least 1"),
        ("[study]\nseed = 4294967296", r"\[study\]: 'seed' must be below 2\*\*31"),
        ("[data]\nsplit_seed = 2147483648", r"\[data\]: 'split_seed' must be below 2\*\*31"),
        (
            '[space]\nweight_decay = { type = "float", low = 0.0, high = 0.1, when = { optimizer'
            ' = "adamw" } }\noptimizer = { type = "categorical", choices = ["adam", "adamw"] }',
            r"\[space\] 'weight_decay' 'when': 'optimizer' is not sampled above this",
        ),
        (
            '[space]\noptimizer = { type = "categorical", choices = ["adam", "adamw"] }\n'
            'weight_decay = { type = "float", low = 0, high = 1, when = { optimizer = "sgdw" } }',
            r"'weight_decay' 'when': 'optimizer' never draws 'sgdw'",
        ),
        (
            '[space]\nnum_conv_blocks = { type = "int", low = 1, high = 3 }\nfilter_growth = '
            '{ type = "float", low = 1.5, high = 2, when = { num_conv_blocks = [3, 4] } }',
            r"'filter_growth' 'when': 'num_conv_blocks' never draws 4",
        ),
        (
            '[space]\noptimizer = { type = "categorical", choices = ["adam", "adamw"] }\n'
            'weight_decay = { type = "float", low = 0.0, high = 0.1, when = "adamw" }',
            r"'weight_decay' 'when': expected a table of hyperparameters sampled above",
        ),
        (
            '[space]\noptimizer = { type = "categorical", choices = ["adam", "adamw"] }\n'
            'weight_decay = { type = "float", low = 0, high = 1, when = { optimizer = "adamw" } }'
            '\n[[enqueue]]\noptimizer = "adam"\nweight_decay = 0.01',
            r"\[\[enqueue\]\] #1 'weight_decay': sampled only when optimizer is 'adamw'",
        ),
    ],
)
def test_mistakes_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        study_file.load(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="study file not found"):
        study_file.load(tmp_path / "nope.toml")


def test_the_study_file_reference_agrees_with_the_code():
    from pathlib import Path

    from digitune import study_file

    reference = Path(__file__).parents[1] / "docs" / "study-files.md"
    assert reference.read_text() == study_file.reference(), (
        "docs/study-files.md is out of date: run `make docs`"
    )
    # Every key of every table is there, with its default.
    for table, settings in study_file.TABLES.items():
        assert f"## [{table}]" in reference.read_text()
        for field in settings.__dataclass_fields__.values():
            assert f"| `{field.name}` |" in reference.read_text()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--trials", "0"], "--trials must be at least 1, got 0"),
        (["--trials", "-5"], "--trials must be at least 1, got -5"),
        (["--timeout-minutes", "inf"], "--timeout-minutes must be a finite number"),
        (["--timeout-minutes", "nan"], "--timeout-minutes must be a finite number"),
        (["--timeout-minutes", "-1"], "--timeout-minutes must be a finite number"),
        (["--workers", "1000"], "--workers must be 1 to 64 worker processes"),
    ],
)
def test_the_command_line_s_budget_is_checked_before_anything_opens(
    project, capfd, arguments, message
):
    from conftest import TINY_STUDY, write_study
    from digitune import cli

    study_file_path = write_study(project, TINY_STUDY)
    assert cli.main(["tune", "--study", str(study_file_path), *arguments]) == 1
    err = capfd.readouterr().err
    assert f"error: {message}" in err
    assert "Traceback" not in err
    # Nothing was started: no study database, no MLflow run.
    assert not (project / "studies" / "tiny.db").exists()
