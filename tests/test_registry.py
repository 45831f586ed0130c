"""Promotion, rollback and listing against a real SQLite-backed MLflow registry, with small
real models trained on the MNIST fixture."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import keras
import mlflow
import mlflow.keras
import mlflow.pyfunc
import numpy as np
import pytest
from scipy import stats

from conftest import command_lines, free_port, wait_for
from digitune import (
    cli,
    config,
    data,
    evaluate,
    loader,
    locks,
    model,
    promotion,
    registry,
    tracking,
)
from digitune.data import mnist

pytestmark = pytest.mark.slow

GOOD = {"learning_rate": 3e-3, "num_filters": 16, "dense_units": 64, "batch_size": 64}
POOR = {"learning_rate": 1e-4, "num_filters": 4, "dense_units": 16, "batch_size": 64}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Weights of a good and a poor model, trained once for the whole module."""
    fixture = mnist.load_folder(Path(__file__).parent / "fixtures" / "mnist-subset")
    split = data.split(fixture)
    folder = tmp_path_factory.mktemp("weights")
    weights = {}
    for name, params, epochs in (("good", GOOD, 3), ("poor", POOR, 1)):
        keras.utils.set_random_seed(0)
        cnn = model.build_model(params)
        cnn.fit(split.x_train, split.y_train, batch_size=64, epochs=epochs, verbose=0)
        weights[name] = folder / f"{name}.weights.h5"
        cnn.save_weights(weights[name])
    return weights


def register(trained, name: str, trial: int):
    """Register the good or the poor model as a new @challenger, as `tune` does."""
    params = GOOD if name == "good" else POOR
    cnn = model.build_model(params)
    cnn.load_weights(trained[name])
    client = tracking.configure(create=True)
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, "registry-test")):
        return str(
            registry.register(
                cnn,
                study_name="registry-test",
                trial_number=trial,
                params=params,
                validation_accuracy=0.5,
                test_accuracy=0.5,
                test_images=300,
                data_sha256="0" * 64,
            ).version
        )


def aliases(client):
    found = {}
    for alias in (config.CHAMPION_ALIAS, config.CHALLENGER_ALIAS):
        version = registry.version_by_alias(client, alias, required=False)
        found[alias] = str(version.version) if version else None
    return found


def test_mcnemar_exact_against_known_values():
    # 10 images only the first model gets right, 2 only the second: 2 * P(X <= 2 | 12, 1/2).
    assert evaluate.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    for first, second in ((10, 2), (0, 7), (30, 41), (5, 5), (120, 80)):
        reference = stats.binomtest(first, first + second, 0.5).pvalue
        assert evaluate.mcnemar_exact(first, second) == pytest.approx(reference, rel=1e-9)
    assert evaluate.mcnemar_exact(0, 0) == 1.0


def test_the_version_description_shows_hyperparameters_rounded_as_a_person_reads_them():
    tags = {
        "trial": "16",
        "study": "mnist-cnn",
        "validation_accuracy": "0.9946",
        "test_accuracy": "0.9941",
        "test_images": "10000",
        "data_sha256": "c655",
    }
    params = {"learning_rate": 0.001908737098447676, "batch_normalization": True, "batch_size": 256}
    description = registry.describe(tags, params)
    assert "| learning_rate | 0.001909 |" in description
    assert "| batch_normalization | True |" in description
    assert "| batch_size | 256 |" in description
    assert "10,000 images" in description


def test_promotion_lifecycle(project, trained, capsys):
    client = tracking.configure(create=True)
    poor = register(trained, "poor", trial=1)

    # No champion yet: the challenger is promoted whatever its accuracy.
    decision = promotion.promote()
    assert decision.promoted and not decision.forced and decision.champion is None
    assert aliases(client) == {"champion": poor, "challenger": poor}

    # A better challenger is promoted, with the evidence on both versions.
    good = register(trained, "good", trial=2)
    assert cli.main(["promote"]) == 0
    assert aliases(client)["champion"] == good
    printed = capsys.readouterr().out
    assert "McNemar exact p-value" in printed and f"promoted version {good}" in printed
    good_tags = client.get_model_version(config.REGISTERED_MODEL_NAME, good).tags
    poor_tags = client.get_model_version(config.REGISTERED_MODEL_NAME, poor).tags
    assert good_tags["promotion.decision"] == "promoted"
    assert good_tags["promotion.compared_with"] == poor
    wins, losses = (
        int(good_tags["promotion.only_this_right"]),
        int(good_tags["promotion.only_other_right"]),
    )
    assert (
        int(poor_tags["promotion.only_this_right"]),
        int(poor_tags["promotion.only_other_right"]),
    ) == (losses, wins)
    assert float(good_tags["promotion.mcnemar_p_value"]) == pytest.approx(
        evaluate.mcnemar_exact(wins, losses), rel=1e-3
    )
    assert float(good_tags["promotion.test_accuracy"]) > float(poor_tags["promotion.test_accuracy"])

    # The test accuracy is the fixture's test set, computed independently here.
    fixture = mnist.load()
    served = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    probabilities = np.asarray(served.predict(data.preprocess(fixture.test_images)))
    assert probabilities.shape == (300, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
    accuracy = np.mean(probabilities.argmax(axis=1) == fixture.test_labels)
    assert float(good_tags["promotion.test_accuracy"]) == pytest.approx(accuracy, abs=1e-4)

    # A worse challenger is refused, and nothing moves.
    worse = register(trained, "poor", trial=3)
    assert cli.main(["promote"]) == 3
    assert "refused" in capsys.readouterr().out
    assert aliases(client) == {"champion": good, "challenger": worse}
    assert (
        client.get_model_version(config.REGISTERED_MODEL_NAME, worse).tags["promotion.decision"]
        == "refused"
    )

    # --force promotes it anyway, and says so in the history and the tags.
    assert cli.main(["promote", "--force"]) == 0
    assert aliases(client)["champion"] == worse
    last = promotion.history(client)[-1]
    assert last["forced"] is True and last["version"] == worse and last["previous"] == good
    assert (
        client.get_model_version(config.REGISTERED_MODEL_NAME, worse).tags["promotion.decision"]
        == "forced"
    )

    # Rollback walks back through the champions, across calls (the history is in the registry).
    assert cli.main(["rollback"]) == 0
    assert aliases(client)["champion"] == good
    assert cli.main(["rollback"]) == 0
    assert aliases(client)["champion"] == poor
    assert cli.main(["rollback"]) == 1
    assert "no previous champion" in capsys.readouterr().err
    assert aliases(client)["champion"] == poor

    # `models` lists every version with its aliases and test accuracy.
    table = registry.versions_table(client)
    assert table["version"].tolist() == [int(poor), int(good), int(worse)]
    assert table.set_index("version").loc[int(poor), "aliases"] == "@champion"
    assert table.set_index("version").loc[int(worse), "aliases"] == "@challenger"


def test_promote_without_model_or_challenger(project, trained, capsys):
    client = tracking.configure(create=True)  # A store that holds no model yet.
    assert cli.main(["promote"]) == 1
    assert "no registered model 'mnist-cnn'" in capsys.readouterr().err
    version = register(trained, "poor", trial=1)
    client.delete_registered_model_alias(config.REGISTERED_MODEL_NAME, config.CHALLENGER_ALIAS)
    assert cli.main(["promote"]) == 1
    assert "no version with alias @challenger" in capsys.readouterr().err
    assert aliases(client) == {"champion": None, "challenger": None}
    assert version == "1"


def test_missing_artifacts_leave_the_aliases_alone(project, trained, capsys):
    client = tracking.configure(create=True)
    first = register(trained, "poor", trial=1)
    assert promotion.promote().promoted
    second = register(trained, "good", trial=2)
    # Delete the model files behind the new version, as a lost disk or a bad copy would.
    version = client.get_model_version(config.REGISTERED_MODEL_NAME, second)
    model_id = version.model_id or version.source.removeprefix("models:/")
    location = client.get_logged_model(model_id).artifact_location
    shutil.rmtree(urlparse(location).path)
    assert cli.main(["promote"]) == 1
    assert "cannot load models:/mnist-cnn/2" in capsys.readouterr().err
    assert aliases(client) == {"champion": first, "challenger": second}


def test_store_that_is_down(project, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for command in (["promote"], ["rollback"], ["models"]):
        assert cli.main(command) == 1
        assert "cannot reach the MLflow tracking store" in capsys.readouterr().err


def _delete_model_files(client, version: str) -> None:
    """Delete the files behind a registered version, as a lost disk or a bad copy would."""
    found = client.get_model_version(config.REGISTERED_MODEL_NAME, version)
    model_id = found.model_id or found.source.removeprefix("models:/")
    shutil.rmtree(urlparse(client.get_logged_model(model_id).artifact_location).path)


def test_force_replaces_a_champion_that_cannot_be_loaded(project, trained, capsys):
    client = tracking.configure(create=True)
    broken = register(trained, "good", trial=1)
    assert promotion.promote().promoted
    _delete_model_files(client, broken)
    challenger = register(trained, "poor", trial=2)
    assert cli.main(["promote"]) == 1
    error = capsys.readouterr().err
    assert f"cannot load models:/mnist-cnn/{broken}" in error and "--force" in error
    assert aliases(client)["champion"] == broken

    assert cli.main(["promote", "--force"]) == 0
    assert aliases(client)["champion"] == challenger
    last = promotion.history(client)[-1]
    assert last["forced"] is True and last["previous"] == broken
    assert "could not be loaded" in last["reason"]


def test_moving_the_champion_is_compare_and_set(project, trained):
    client = tracking.configure(create=True)
    first = register(trained, "poor", trial=1)
    promotion.move_champion(client, first, None, "promote", "first")
    second = register(trained, "good", trial=2)
    # A promotion that compared against no champion, or against another version, loses.
    for stale in (None, second):
        with pytest.raises(registry.RegistryError, match=f"moved to version {first}"):
            promotion.move_champion(client, second, stale, "promote", "stale")
    assert aliases(client)["champion"] == first
    assert [event["version"] for event in promotion.history(client)] == [first]


def test_a_held_champion_lock_makes_others_wait_then_refuse(project, trained, monkeypatch):
    client = tracking.configure(create=True)
    version = register(trained, "poor", trial=1)
    monkeypatch.setattr(promotion, "LOCK_WAIT_SECONDS", 0.5)
    with promotion.champion_lock(client):
        with pytest.raises(registry.RegistryError, match="@champion is locked by .*:"):
            promotion.move_champion(client, version, None, "promote", "while locked")
    assert aliases(client)["champion"] is None and promotion.history(client) == []
    # A lock left behind by a killed process is taken over once it is stale.
    client.create_registered_model(config.REGISTERED_MODEL_NAME + promotion.LOCK_SUFFIX)
    monkeypatch.setattr(locks, "STALE_SECONDS", 0.0)
    promotion.move_champion(client, version, None, "promote", "after a stale lock")
    assert aliases(client)["champion"] == version
    lock_names = [m.name for m in client.search_registered_models() if "lock" in m.name]
    assert lock_names == [config.REGISTERED_MODEL_NAME + promotion.LOCK_SUFFIX + ".stale-None"]


def test_two_concurrent_promotions_have_one_winner_and_a_whole_history(project, trained):
    client = tracking.configure(create=True)
    first = register(trained, "poor", trial=1)
    assert promotion.promote().promoted
    second = register(trained, "good", trial=2)
    mlflow.set_tracking_uri(None)
    command = [sys.executable, "-m", "digitune", "promote"]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes = [(process.wait(timeout=300), *process.communicate()) for process in processes]
    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 1], outcomes
    loser_error = next(error for code, _, error in outcomes if code == 1)
    assert f"@champion moved to version {second}" in loser_error or (
        f"version {second} is already @champion" in loser_error
    )
    client = tracking.configure(create=True)
    assert aliases(client)["champion"] == second
    events = promotion.history(client)
    assert [(event["version"], event["previous"]) for event in events] == [
        (first, None),
        (second, first),
    ]


def test_loading_from_a_tracking_server_leaves_no_temporary_folder(
    project, trained, tmp_path, monkeypatch
):
    import tempfile

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "digitune", "mlflow-server", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process=server)
        # The server runs without MLflow's GenAI job runner: no Huey consumer processes.
        assert [line for line in command_lines(session=server.pid) if "huey" in line] == []
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        version = register(trained, "good", trial=1)
        # Every temporary folder this process makes from here on lands in `private`.
        private = tmp_path / "private-tmp"
        private.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(private))
        client = tracking.configure(create=True)
        loaded = loader.load(client.get_model_version("mnist-cnn", version))
        assert np.asarray(loaded.predict(np.zeros((1, 28, 28, 1), np.float32))).shape == (1, 10)
        assert os.listdir(private) == []
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_the_champion_history_outlasts_postgresql_s_tag_column(
    project, trained, postgres_url, monkeypatch
):
    """MLflow's SQL stores keep a registered-model tag in VARCHAR(5000), which PostgreSQL
    enforces: 30 moves with reasons as long as promote's, then a rollback, lose nothing."""
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", postgres_url.replace("postgresql:", "postgresql+psycopg:")
    )
    client = tracking.configure(create=True)
    versions = [register(trained, "poor", trial=1), register(trained, "good", trial=2)]
    reason = "test accuracy 0.9941 vs 0.9936 (+0.05 points, required more than 0 and at least "
    reason += "0.00; McNemar p = 0.581) " * 3
    previous = None
    for move in range(30):
        version = versions[move % 2]
        promotion.move_champion(client, version, previous, "promote", reason, test_accuracy=0.99)
        previous = version
    events = promotion.history(client)
    assert len(events) == 30 and [e["version"] for e in events[-2:]] == versions
    assert events[-1]["reason"] == reason
    # A reason too long for one tag is cut, and the move still happens.
    promotion.move_champion(client, versions[0], versions[1], "promote", "x" * 6000)
    assert promotion.history(client)[-1]["reason"].endswith(" ...")
    assert promotion.rollback(client) == (versions[0], versions[1])
    assert aliases(client)["champion"] == versions[1]


HOLD_THE_LOCK = """
import json, time
from digitune import locks, promotion, tracking
locks.STALE_SECONDS, locks.BEAT_SECONDS = 1.0, 0.2
client = tracking.configure(create=True)
with promotion.champion_lock(client):
    began = time.time()
    time.sleep(1.5)  # Longer than the lock takes to go stale: only its beat keeps it.
    ended = time.time()
print(json.dumps([began, ended]))
"""


def test_processes_that_find_a_stale_lock_at_once_hold_it_one_at_a_time(project):
    """Three processes wait together on a lock a killed process left behind: one takes it
    over, none removes another's, and each holds it alone while the others wait."""
    client = tracking.configure(create=True)
    name = config.REGISTERED_MODEL_NAME + promotion.LOCK_SUFFIX
    client.create_registered_model(name, tags={"holder": "killed", "token": "dead", "beat": "0"})
    mlflow.set_tracking_uri(None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD_THE_LOCK], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    held = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
        held.append(json.loads(out.decode().strip().splitlines()[-1]))
    held.sort()
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(held)), held
    client = tracking.configure(create=True)
    names = sorted(m.name for m in client.search_registered_models() if "lock" in m.name)
    assert names == [f"{name}.stale-dead"]  # The takeover's record; no lock is left.


def test_a_lock_released_while_the_store_reports_it_taken_is_taken_at_once(project, monkeypatch):
    """The store tells of a taken name by looking its holder up; when the holder releases
    the lock in between, the lookup finds nothing. The waiter tries again, and holds it."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    client = tracking.configure(create=True)
    name = config.REGISTERED_MODEL_NAME + promotion.LOCK_SUFFIX
    client.create_registered_model(name, tags={"holder": "another", "token": "theirs"})
    real_lookup, released = SqlAlchemyStore.get_registered_model, []

    def holder_releases_first(store, model_name):
        if not released:  # The holder finishes between the failed insert and the lookup.
            released.append(model_name)
            store.delete_registered_model(model_name)
        return real_lookup(store, model_name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", holder_releases_first)
    with locks.held(client, name, "the champion", wait_seconds=5):
        assert released == [name]
        assert client.get_registered_model(name).tags["holder"] != "another"
    assert name not in {m.name for m in client.search_registered_models()}


def test_a_lock_is_released_only_by_its_holder(project):
    client = tracking.configure(create=True)
    name = config.REGISTERED_MODEL_NAME + promotion.LOCK_SUFFIX
    client.create_registered_model(name, tags={"token": "someone else's"})
    locks.release(client, name, token="mine")
    assert client.get_registered_model(name).tags["token"] == "someone else's"


def test_promote_predicts_the_test_set_a_batch_at_a_time(project, trained, monkeypatch):
    """Each candidate sees the test set PREDICT_BATCH images at a time, never all at once,
    and the verdict is the one a single call would give."""
    register(trained, "poor", trial=1)
    promotion.promote()
    good = register(trained, "good", trial=2)
    sizes = []
    load = loader.load

    def measured(version):
        loaded = load(version)
        predict = loaded.network.predict_on_batch

        def predict_and_count(images):
            sizes.append(len(images))
            return predict(images)

        loaded.network.predict_on_batch = predict_and_count
        return loaded

    monkeypatch.setattr(loader, "load", measured)
    monkeypatch.setattr(loader, "PREDICT_BATCH", 64)
    decision = promotion.promote()
    assert decision.challenger == good and decision.promoted
    test_images = 300  # The fixture's, as each version's test_images tag says.
    assert sizes == [64, 64, 64, 64, 44] * 2  # The challenger, then the champion.
    client = tracking.configure(create=True)
    version = client.get_model_version(config.REGISTERED_MODEL_NAME, good)
    dataset = data.from_spec(version.tags.get("data_spec"))  # MNIST, the fixture here.
    whole = load(version).predict(data.preprocess(dataset.test_images))
    assert len(whole) == test_images
    reference = evaluate.from_probabilities(whole, dataset.test_labels, dataset.class_names)
    assert decision.challenger_evaluation.accuracy == pytest.approx(reference.accuracy)


class _CodeOnLoad(mlflow.pyfunc.PythonModel):
    """What anyone who can write to the registry could register: Python that runs when the
    version is loaded (here it only leaves a file behind)."""

    def __init__(self, marker: str):
        self.marker = marker

    def load_context(self, context):
        Path(self.marker).write_text("ran")

    def predict(self, context, model_input, params=None):
        return np.full((len(model_input), 10), 0.1, dtype="float32")


def _plant(client, logged, alias: str) -> str:
    """Register what `logged` logs into mnist-cnn with digitune's own tags, as someone
    who knows them would, and point `alias` at it; returns its version."""
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, "intruder")):
        with contextlib.redirect_stderr(io.StringIO()):
            info = logged()
        version = mlflow.register_model(info.model_uri, config.REGISTERED_MODEL_NAME).version
    for key, value in {"study": "registry-test", "trial": "9", "format": "keras"}.items():
        client.set_model_version_tag(config.REGISTERED_MODEL_NAME, version, key, value)
    client.set_registered_model_alias(config.REGISTERED_MODEL_NAME, alias, version)
    return str(version)


def test_serve_promote_and_rollback_load_no_code_from_the_registry(project, trained, tmp_path):
    """Versions that would run code when loaded (a pickled pyfunc, a Keras Lambda layer), a
    TensorFlow SavedModel, are refused by name and reason: nothing of theirs runs, no alias
    moves. digitune's own versions, single networks and ensembles, load in safe mode."""
    from digitune import serve

    champion = register(trained, "good", trial=1)
    promotion.promote()
    client = tracking.configure(create=True)
    marker = tmp_path / "ran"
    signature = registry.signature()
    pickled = _plant(
        client,
        lambda: mlflow.pyfunc.log_model(
            name="model", python_model=_CodeOnLoad(str(marker)), signature=signature
        ),
        "challenger",
    )
    with pytest.raises(registry.RegistryError) as refused:
        promotion.promote(force=True)
    assert str(refused.value).startswith(
        f"refusing to load models:/mnist-cnn/{pickled}: it is not a Keras model (flavours "
        "python_function, loaded by mlflow.pyfunc.model)"
    )
    assert aliases(client) == {"champion": champion, "challenger": pickled}

    # A Keras file whose Lambda layer holds Python bytecode.
    inputs = keras.Input((28, 28, 1))
    code = keras.layers.Lambda(
        lambda x, marker: x + 0.0 * open(marker, "w").write("ran"),
        arguments={"marker": str(marker)},
        output_shape=(28, 28, 1),
    )
    flat = keras.layers.Flatten()(code(inputs))
    lambda_model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(flat))
    marker.unlink()  # Building the model ran the Lambda once, here.
    with_code = _plant(
        client,
        lambda: mlflow.keras.log_model(lambda_model, name="model", signature=signature),
        "challenger",
    )
    with pytest.raises(registry.RegistryError, match="does not load in safe mode"):
        promotion.promote(force=True)
    assert aliases(client) == {"champion": champion, "challenger": with_code}

    # A SavedModel, as digitune registered before: refused, saying how to register again.
    saved_model = _plant(
        client,
        lambda: mlflow.keras.log_model(
            model.build_model(GOOD), name="model", signature=signature, save_exported_model=True
        ),
        "challenger",
    )
    with pytest.raises(registry.RegistryError, match="exported TensorFlow SavedModel.*register"):
        promotion.promote(force=True)

    # serve keeps the champion it has when the alias moves to any of them, and says why.
    holder = serve.ModelHolder("models:/mnist-cnn@champion")
    assert holder.reload() and holder.served.version == champion
    for planted in (pickled, with_code, saved_model):
        client.set_registered_model_alias("mnist-cnn", "champion", planted)
        assert holder.reload() is False and holder.served.version == champion
        assert f"refusing to load models:/mnist-cnn/{planted}" in holder.last_error
        # Nor does a fresh server load it.
        fresh = serve.ModelHolder("models:/mnist-cnn@champion")
        assert fresh.reload() is False and fresh.served is None
    assert not marker.exists()

    # Rollback refuses to put one back as champion.
    client.set_registered_model_alias("mnist-cnn", "champion", champion)
    with pytest.raises(registry.RegistryError, match="refusing to load"):
        loader.load(client.get_model_version("mnist-cnn", pickled))
    assert not marker.exists()

    # digitune's own version is a Keras file and loads, in safe mode, as the network it is.
    loaded = loader.load(client.get_model_version("mnist-cnn", champion))
    network = model.build_model(GOOD)
    network.load_weights(trained["good"])
    images = data.preprocess(
        mnist.load_folder(Path(__file__).parent / "fixtures" / "mnist-subset").test_images[:50]
    )
    np.testing.assert_allclose(
        loaded.predict(images), network.predict(images, verbose=0), atol=1e-5
    )


def test_a_registration_cut_short_is_completed_by_running_it_again(project, trained, monkeypatch):
    """A crash after the version exists, before its description and alias are set: running
    the registration again completes that version rather than registering a second, and a
    version registered whole is left as it is."""
    client = tracking.configure(create=True)
    first = register(trained, "poor", trial=1)
    promotion.promote()

    def crash(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    with monkeypatch.context() as patched:
        patched.setattr(mlflow.MlflowClient, "set_registered_model_alias", crash)
        with pytest.raises(ConnectionError):
            register(trained, "good", trial=2)
    (cut_short,) = [
        v for v in client.search_model_versions("name = 'mnist-cnn'") if v.tags["trial"] == "2"
    ]
    assert cut_short.tags.get(registry.REGISTRATION_TAG) is None
    assert aliases(client) == {"champion": first, "challenger": first}

    again = register(trained, "good", trial=2)
    assert again == str(cut_short.version)
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == 2
    version = client.get_model_version("mnist-cnn", again)
    assert version.tags[registry.REGISTRATION_TAG] == "complete"
    assert "Best trial 2 of study **registry-test**" in version.description
    assert aliases(client) == {"champion": first, "challenger": again}

    # Whole, it is not touched again: the challenger stays where a later study put it.
    client.set_registered_model_alias("mnist-cnn", "challenger", first)
    assert register(trained, "good", trial=2) == again
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == 2
    assert aliases(client) == {"champion": first, "challenger": first}
    # What `tune` and `register` then print says where the aliases are, not where they were.
    assert registry.aliases_of("mnist-cnn", again) == "no alias"
    assert registry.aliases_of("mnist-cnn", first) == "aliases @challenger, @champion"
