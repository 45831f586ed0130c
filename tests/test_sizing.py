"""Defaults that follow the data: a study that names only its pictures and a time budget
trains each trial for as many optimizer steps as MNIST's do, searches a space the pictures
allow, and uses the whole budget; what its file says is kept."""

from __future__ import annotations

import math
import re

import mlflow
import pytest

from conftest import write_study
from digitune import config, sizing, space, study_file
from digitune.engines import optuna_search
from test_datasets import picture_folder

ONLY_THE_DATA = """
[study]
name = "{name}"
timeout_minutes = {minutes}

[data]
folder = "pictures/shapes"
"""


@pytest.mark.parametrize(
    ("count", "shape", "blocks"),
    [(50_000, (28, 28, 1), 3), (833, (40, 40, 1), 3), (1_198, (8, 8, 1), 2), (250, (4, 4, 3), 1)],
)
def test_a_trial_s_budget_is_mnist_s_in_optimizer_steps_whatever_the_count(count, shape, blocks):
    plan = sizing.Plan(count, shape, 4)
    steps = math.ceil(count / plan.batch_sizes[1])
    # As many steps as MNIST's six epochs of 391 batches, to within one epoch.
    assert sizing.TARGET_STEPS <= plan.max_epochs * steps < sizing.TARGET_STEPS + steps
    assert plan.patience == max(2, plan.max_epochs // 3)
    # Each block halves the pictures: as many as leave them at least 2x2, at most 3.
    side = min(shape[:2])
    assert plan.max_blocks == blocks
    assert 2**blocks <= side / 2 and (blocks == 3 or 2 ** (blocks + 1) > side / 2)


def test_mnist_s_own_defaults_are_what_sizing_gives_for_mnist():
    plan = sizing.Plan(50_000, (28, 28, 1), 10)
    defaults = config.TrainingSettings()
    assert (plan.max_epochs, plan.patience) == (
        defaults.max_epochs,
        defaults.early_stopping_patience,
    )


def test_what_the_file_says_is_kept_and_the_rest_is_sized(project):
    path = write_study(project, ONLY_THE_DATA.format(name="shapes", minutes=6))
    definition = study_file.load(path)
    assert definition.distributions == {} and definition.given == {
        "study.name",
        "study.timeout_minutes",
    }

    sized, line = sizing.sized(definition, 833, (40, 40, 1), 4, mnist=False)
    assert sized.training.max_epochs == 87 and sized.training.early_stopping_patience == 29
    assert sized.study.n_trials == sizing.TRIALS_UNTIL_THE_TIME_IS_UP  # the time decides
    assert {"augment_shift", "augment_rotation_degrees", "batch_normalization"} <= set(
        sized.distributions
    )
    assert sized.distributions["num_conv_blocks"].high == 3
    # The careful configuration tried first lies within the space.
    space.enqueued(list(sized.enqueued), sized.distributions, sized.fixed, path)
    assert line.startswith("sized for 833 training pictures of 40x40x1 in 4 classes: 87 epochs")

    # Written in the file: kept. MNIST keeps its budget; only a missing space is sized.
    text = ONLY_THE_DATA.format(name="shapes", minutes=6) + "\n[training]\nmax_epochs = 5\n"
    kept, _ = sizing.sized(study_file.load(write_study(project, text)), 833, (40, 40, 1), 4, False)
    assert kept.training.max_epochs == 5 and kept.training.early_stopping_patience == 29
    mnist, line = sizing.sized(definition, 50_000, (28, 28, 1), 10, mnist=True)
    assert mnist.training == definition.training and mnist.study == definition.study
    assert "epochs" not in line and "a space of" in line
    # A budget given on the command line is given too.
    counted, _ = sizing.sized(definition.with_budget(n_trials=3), 833, (40, 40, 1), 4, False)
    assert counted.study.n_trials == 3


def test_a_network_of_your_own_needs_its_space(project):
    (project / "nets.py").write_text(
        "def build(params, input_shape, num_classes):\n    pass\n\n"
        'build.hyperparameters = {"width": {"default": 8, "low": 1, "high": 64}}\n'
    )
    text = ONLY_THE_DATA.format(name="own", minutes=1) + '\n[model]\nbuilder = "nets:build"\n'
    path = write_study(project, text)
    with pytest.raises(ValueError, match=r"no \[space\]; a network of your own .* width"):
        study_file.load(path)


@pytest.mark.slow
def test_a_study_naming_only_its_pictures_and_time_uses_the_whole_time(project, caplog):
    picture_folder(project / "pictures" / "shapes", per_class=30)
    minutes = 0.3
    path = write_study(project, ONLY_THE_DATA.format(name="sized", minutes=minutes))
    with caplog.at_level("INFO", logger="digitune"):
        outcome = optuna_search.run(path, progress_bar=False)
    assert outcome.seconds >= minutes * 60
    assert outcome.model_version == "1"

    # The careful configuration was the first trial; the line and the parent run say what
    # was sized.
    first = outcome.study.trials[0]
    assert first.params["batch_normalization"] is True and first.params["augment_shift"] == 0.1
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("sized for"))
    count = int(re.match(r"sized for (\d+) training pictures of 28x28x1 in 10 classes", line)[1])
    parent = mlflow.MlflowClient().get_run(outcome.parent_run_id)
    assert parent.data.params["sized"] == line
    epochs = sizing.Plan(count, (28, 28, 1), 10).max_epochs
    assert parent.data.params["training.max_epochs"] == str(epochs)
