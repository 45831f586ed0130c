"""Your own network (`[model] builder`): the example ResNet tuned with its costs measured,
registered, loaded in safe mode, promoted, served and exported through the real stores; and
a builder's mistakes, each named by file, table and key before anything trains."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import write_study
from digitune import (
    artifacts,
    data,
    deployment,
    ensemble,
    loader,
    promotion,
    serve,
    space,
    study_file,
    tracking,
)
from digitune.data import mnist
from digitune.engines import optuna_search

EXAMPLES = Path(__file__).parents[1] / "examples"

RESNET_STUDY = """
[study]
name = "resnet"
n_trials = 2
seed = 3
n_startup_trials = 2
pruner = "none"

[training]
max_epochs = 1
train_images = 600

[model]
builder = "my_networks.resnet:build"

[objectives]
max_int8_kb = 1000

[registry]
model_name = "fixture-resnet"

[space]
learning_rate = { type = "float", low = 3e-3, high = 1e-2, log = true }
batch_size = 64
num_stages = 2
num_filters = { type = "int", low = 4, high = 8, step = 4 }
augment_shift = 0.05
"""


def _forget_examples() -> None:
    """This process as a machine that never imported the example: its module and layer
    unknown to Python and Keras."""
    for name in [name for name in sys.modules if name.split(".")[0] == "my_networks"]:
        del sys.modules[name]
    keras.saving.get_custom_objects().pop("digitune_examples>ResidualBlock", None)


@pytest.mark.slow
def test_the_example_resnet_tunes_registers_serves_and_exports(project):
    # The example copied into a project of the user's own, as a package of theirs.
    (project / "my_networks").mkdir()
    shutil.copy(EXAMPLES / "resnet.py", project / "my_networks" / "resnet.py")
    _forget_examples()
    study_path = write_study(project, RESNET_STUDY)
    outcome = optuna_search.run(study_path, progress_bar=False)
    assert outcome.states == {"complete": 2}

    # Every trial's params name the builder and rebuild its network; its costs are measured
    # on that network (params: its weights, counted by Keras).
    best = outcome.study.trials[outcome.best.number]
    params = space.params_of(best)
    assert params["builder"] == "my_networks.resnet:build" and params["num_stages"] == 2
    trained = artifacts.load_model(params, best.user_attrs[tracking.TRIAL_RUN_ATTR])
    assert {type(layer).__name__ for layer in trained.layers[-2].layers} >= {"ResidualBlock"}
    run = mlflow.get_run(best.user_attrs[tracking.TRIAL_RUN_ATTR])
    assert run.data.metrics["params"] == trained.count_params()
    assert 0 < run.data.metrics["int8_kb"] < 1000

    # Registered as the study's model, in Keras's format: it loads in safe mode and predicts
    # as the trial's own network does, and its version says which builder it needs.
    assert outcome.model_name == "fixture-resnet" and outcome.model_version == "1"
    client = mlflow.MlflowClient()
    version = client.get_model_version("fixture-resnet", "1")
    assert version.tags["builder"] == "my_networks.resnet:build"
    pictures = mnist.load().test_images[:50]
    images = data.preprocess(pictures)
    loaded = loader.load(version)
    expected = trained.predict(images, verbose=0)
    np.testing.assert_allclose(loaded.predict(images), expected, atol=1e-5)

    # Promoted and served: the served answers are the network's.
    promotion.promote(model_name="fixture-resnet")
    app = serve.create_app("models:/fixture-resnet@champion", poll_seconds=0)
    with TestClient(app) as http:
        assert app.state.holder.first_attempt.wait(120)
        answer = http.post("/predict", json={"images": pictures[:5].tolist()}).json()
    assert [row["class_index"] for row in answer["predictions"]] == expected[:5].argmax(1).tolist()

    # Exported to TFLite, which agrees with Keras on the test set.
    table = deployment.export(model_name="fixture-resnet").set_index("format")
    keras_accuracy = table.loc["Keras SavedModel (float32)", "test_accuracy"]
    assert table.loc["TFLite float32", "test_accuracy"] == pytest.approx(keras_accuracy, abs=1e-9)

    # The ensemble of both trials is one Keras model of the two networks; it names their
    # builder too.
    both = ensemble.run(study_path, top=2)
    together = client.get_model_version("fixture-resnet", both.model_version)
    assert together.tags["builder"] == "my_networks.resnet:build"

    # Where the builder's module cannot be imported, the versions are refused, saying which.
    shutil.rmtree(project / "my_networks")
    _forget_examples()
    for registered in (version, together):
        with pytest.raises(loader.RegistryError, match=r"my_networks\.resnet:build"):
            loader.load(registered)


# A builder module written into the project, as a user's own package would be.
BUILDERS = """
import keras
from keras import layers


def build(params, input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    features = layers.Flatten()(inputs)
    features = layers.Dense(params["width"], activation=params["activation"])(features)
    classes = num_classes + params["extra_classes"]
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(features))


build.hyperparameters = {
    "width": {"default": 16, "low": 4, "high": 64},
    "activation": {"default": "relu", "choices": ["relu", "tanh"]},
    "kernel": {"default": 3, "choices": [3, 5]},
    "extra_classes": {"default": 0, "low": 0, "high": 2},
}


def undeclared(params, input_shape, num_classes):
    return None


def clashing(params, input_shape, num_classes):
    return None


clashing.hyperparameters = {"learning_rate": {"default": 0.1}}
"""

BUILDER_STUDY = """
[study]
name = "own"

[model]
builder = "{builder}"

[space]
{space}
"""


@pytest.mark.parametrize(
    ("builder", "space_line", "message"),
    [
        ("own_nets.build", "width = 8", "[model] 'builder': expected \"package.module:function\""),
        ("no_such_package.nets:build", "width = 8", "[model] 'builder': cannot import"),
        ("own_nets:missing", "width = 8", "has no function missing"),
        ("own_nets:undeclared", "width = 8", "declares no hyperparameters"),
        ("own_nets:clashing", "width = 8", "'learning_rate': digitune's own"),
        (
            "own_nets:build",
            'num_conv_blocks = { type = "int", low = 1, high = 2 }',
            "[space] 'num_conv_blocks': not a hyperparameter of own_nets:build; known ones are",
        ),
        (
            "own_nets:build",
            'width = { type = "int", low = 4, high = 128 }',
            "[space] 'width' 'high': must be an integer from 4 to 64, got 128",
        ),
        (
            "own_nets:build",
            'kernel = { type = "int", low = 3, high = 5 }',
            "[space] 'kernel' (it draws 4): must be one of 3, 5, got 4",
        ),
        (
            "own_nets:build",
            'activation = { type = "categorical", choices = ["relu", "gelu"] }',
            "[space] 'activation' choice 'gelu': must be one of relu, tanh",
        ),
        ("own_nets:build", 'builder = "x:y"', "[space] 'builder': set by [model]"),
    ],
)
def test_a_builder_s_mistakes_name_the_file_the_table_and_the_key(
    project, builder, space_line, message
):
    (project / "own_nets.py").write_text(BUILDERS)
    sys.modules.pop("own_nets", None)
    path = write_study(project, BUILDER_STUDY.format(builder=builder, space=space_line))
    with pytest.raises(ValueError) as raised:
        study_file.load(path)
    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)


def test_a_builder_s_network_is_checked_against_the_data_and_trained_like_ours(project):
    (project / "own_nets.py").write_text(BUILDERS)
    sys.modules.pop("own_nets", None)
    searched = 'width = { type = "int", low = 8, high = 16, step = 8 }\nactivation = "tanh"'
    path = write_study(project, BUILDER_STUDY.format(builder="own_nets:build", space=searched))
    definition = study_file.load(path)
    assert definition.fixed == {"activation": "tanh", "builder": "own_nets:build"}
    # Our training hyperparameters are its too: the model compiles with them.
    from digitune import model

    params = {**definition.fixed, "width": 8, "learning_rate": 0.004, "optimizer": "sgd"}
    cnn = model.build_model(params)
    assert type(cnn.optimizer).__name__ == "SGD"
    assert float(cnn.optimizer.learning_rate) == pytest.approx(0.004)
    # Flatten, then 784 * 8 + 8 and 8 * 10 + 10 weights: the builder's network, whole.
    assert cnn.count_params() == 784 * 8 + 8 + 8 * 10 + 10
    assert cnn.layers[-2].layers[2].activation.__name__ == "tanh"
    with pytest.raises(ValueError, match=r"own_nets:build built a model that gives \(None, 11\)"):
        model.build_model({**params, "extra_classes": 1})


def test_the_example_study_file_names_the_example_builder(monkeypatch):
    # As `make tune STUDY=examples/resnet.toml` reads it, from the repository's folder.
    monkeypatch.setenv("DIGITUNE_HOME", str(EXAMPLES.parent))
    definition = study_file.load(EXAMPLES / "resnet.toml")
    assert definition.fixed["builder"] == "examples.resnet:build"
    assert {"num_stages", "blocks_per_stage", "learning_rate"} <= set(definition.distributions)
    assert definition.model_name == "mnist-resnet"
