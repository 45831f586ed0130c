"""Datasets named in the study file: a folder of pictures, scikit-learn's digits, the known
datasets' downloads (from a file server on 127.0.0.1), honest splits, and each study's own
registered model."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import itertools
import json
import pickle
import tarfile
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE_DIR, TINY_STUDY, write_study
from digitune import cli, config, data, model, promotion, serve, study_file
from digitune.data import mnist, published
from digitune.engines import optuna_search

# The fixture's digits saved as PNG files under class folders named in words: the class
# names come from the folders, in sorted order (eight, five, four, nine, one, ...).
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def picture_folder(root: Path, per_class: int = 30, split: bool = False) -> Path:
    """A folder of the fixture's digits as PNGs, one sub-folder per class (in train/ and
    test/ with `split`)."""
    digits = mnist.load_folder(FIXTURE_DIR)
    parts = {"train": (digits.train_images, digits.train_labels)}
    if split:
        parts["test"] = (digits.test_images, digits.test_labels)
    for part, (images, labels) in parts.items():
        for digit, word in enumerate(WORDS):
            folder = root / part / word if split else root / word
            folder.mkdir(parents=True, exist_ok=True)
            for index in np.flatnonzero(labels == digit)[:per_class]:
                Image.fromarray(images[index]).save(folder / f"{part}-{index:05d}.png")
    return root


def settings(**values) -> config.DataSettings:
    return config.DataSettings(**values)


# Study files.


def test_data_and_registry_tables_are_read_and_default_to_mnist(project):
    default = study_file.load(write_study(project, _study("")))
    assert default.data == config.DataSettings() and default.model_name == "mnist-cnn"
    digits = study_file.load(write_study(project, _study('[data]\ndataset = "sklearn-digits"\n')))
    assert digits.model_name == "sklearn-digits-cnn"
    pictures = study_file.load(
        write_study(project, _study('[data]\nfolder = "pictures/My Shapes"\n'))
    )
    assert pictures.data.name == "my-shapes" and pictures.model_name == "my-shapes-cnn"
    named = study_file.load(write_study(project, _study('[registry]\nmodel_name = "mine"\n')))
    assert named.model_name == "mine"
    # The shipped quick study never moves the real study's @challenger.
    assert study_file.load(_shipped("quick.toml")).model_name != "mnist-cnn"
    assert study_file.load(_shipped("mnist-cnn.toml")).model_name == "mnist-cnn"


@pytest.mark.parametrize(
    "table, message",
    [
        ('[data]\ndataset = "imagenet"\n', "'dataset' must be one of mnist, fashion-mnist"),
        ('[data]\ndataset = "cifar10"\nfolder = "x"\n', "give 'dataset' or 'folder', not both"),
        ('[data]\ndataset = "folder"\n', "needs 'folder'"),
        ("[data]\nimage_size = 32\n", "'image_size' and 'color_mode' are for a 'folder'"),
        ('[data]\nfolder = "x"\ntest_fraction = 1.0\n', "'test_fraction' must be between"),
        ('[data]\nfolder = "x"\ncolor_mode = "cmyk"\n', "'color_mode' must be one of"),
        ('[registry]\nmodel_name = "../up"\n', "[registry]: model_name '../up' is not allowed"),
        ('[registry]\nname = "x"\n', "[registry]: unknown key 'name'"),
    ],
)
def test_bad_data_and_registry_tables_name_file_table_and_key(project, table, message):
    path = write_study(project, _study(table))
    with pytest.raises(ValueError) as error:
        study_file.load(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_the_dataset_s_shape_is_not_a_hyperparameter(project):
    path = write_study(project, _study("").replace("dense_units = 32", "num_classes = 5"))
    with pytest.raises(ValueError, match=r"\[space\] 'num_classes': set by \[data\]"):
        study_file.load(path)


# A folder of pictures.


def test_a_folder_is_read_with_its_class_names_and_an_honest_held_out_test_set(tmp_path):
    root = picture_folder(tmp_path / "digits")
    dataset = data.load(settings(folder=str(root)))
    assert dataset.class_names == tuple(sorted(WORDS))
    assert dataset.image_shape == (28, 28, 1)
    assert dataset.params == {
        "image_height": 28,
        "image_width": 28,
        "image_channels": 1,
        "num_classes": 10,
    }
    assert len(dataset.train_labels) + len(dataset.test_labels) == 300
    # A stratified fifth: 6 of each class's 30.
    assert np.bincount(dataset.test_labels).tolist() == [6] * 10
    # The same pictures as on disk, labelled by their folder.
    word = dataset.class_names[dataset.test_labels[0]]
    on_disk = [np.asarray(Image.open(p)) for p in sorted((root / word).glob("*.png"))]
    assert any(np.array_equal(dataset.test_images[0], picture) for picture in on_disk)
    # Held out once: the same list again, another with another seed.
    again = data.load(settings(folder=str(root)))
    assert again.test_files_sha256 == dataset.test_files_sha256 != ""
    assert again.digest == dataset.digest
    other = data.load(settings(folder=str(root), split_seed=1))
    assert other.test_files_sha256 != dataset.test_files_sha256


def test_a_folder_with_train_and_test_keeps_its_own_test_set(tmp_path):
    root = picture_folder(tmp_path / "split", per_class=10, split=True)
    dataset = data.load(settings(folder=str(root)))
    assert len(dataset.test_labels) == len(list((root / "test").glob("*/*.png"))) == 100
    assert len(dataset.train_labels) == 100 and dataset.test_files_sha256 == ""


def test_pictures_are_resized_and_coloured_as_asked(tmp_path):
    root = picture_folder(tmp_path / "digits", per_class=5)
    dataset = data.load(settings(folder=str(root), image_size=16, color_mode="rgb"))
    assert dataset.train_images.shape[1:] == (16, 16, 3)
    assert dataset.params["image_channels"] == 3
    # "auto": grey pictures stay grey until one picture has colour; then all are RGB, the grey
    # ones repeated in the three channels.
    assert data.load(settings(folder=str(root))).image_shape == (28, 28, 1)
    Image.new("RGB", (28, 28), (200, 30, 30)).save(root / "one" / "red.png")
    mixed = data.load(settings(folder=str(root), test_fraction=0.5))
    assert mixed.image_shape == (28, 28, 3)
    every = np.concatenate([mixed.train_images, mixed.test_images])
    assert sum(not np.array_equal(image[..., 0], image[..., 1]) for image in every) == 1


@pytest.mark.parametrize(
    "fault", ["missing", "one class", "empty class", "sizes", "unreadable", "too few"]
)
def test_a_bad_folder_gets_an_error_naming_the_path(tmp_path, fault):
    root = picture_folder(tmp_path / "digits", per_class=2 if fault == "too few" else 5)
    named = root
    if fault == "missing":
        named = root = tmp_path / "nowhere"
    elif fault == "one class":
        root = tmp_path / "single"
        (root / "cats").mkdir(parents=True)
        named = root
    elif fault == "empty class":
        named = root / "ten"
        named.mkdir()
    elif fault == "sizes":
        named = root / "one" / "big.png"
        Image.new("L", (32, 32)).save(named)
    elif fault == "unreadable":
        named = root / "two" / "broken.png"
        named.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(data.DataError) as error:
        data.load(settings(folder=str(root)))
    assert str(named) in str(error.value)


def test_a_folder_opens_only_png_jpeg_bmp_gif_and_checks_the_size_before_decoding(tmp_path):
    root = picture_folder(tmp_path / "digits", per_class=5)
    # A TIFF named .png: Pillow would read it, but no reader beyond the four may run.
    disguised = root / "two" / "tiff.png"
    Image.new("L", (28, 28)).save(disguised, format="TIFF")
    with pytest.raises(data.DataError, match="not a readable PNG/JPEG/BMP/GIF picture") as error:
        data.load(settings(folder=str(root)))
    assert str(disguised) in str(error.value)
    disguised.unlink()
    # A PNG whose header claims 5000x5000 pixels, cut after 200 bytes: refused on its header.
    claimed = root / "three" / "huge.png"
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 5000)).save(huge)
    claimed.write_bytes(huge.read_bytes()[:200])
    with pytest.raises(data.DataError, match="5000x5000 pixels is too big") as error:
        data.load(settings(folder=str(root)))
    assert str(claimed) in str(error.value)
    claimed.unlink()
    # A GIF gives its first frame.
    frames = [Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)]
    frames[0].save(root / "four" / "animated.gif", save_all=True, append_images=frames[1:])
    loaded = data.load(settings(folder=str(root), test_fraction=0.5))
    every = np.concatenate([loaded.train_images, loaded.test_images])
    assert any(not image.any() for image in every)  # The black first frame is there.


# scikit-learn's digits.


def test_sklearn_digits_are_a_second_real_dataset():
    dataset = data.load(settings(dataset="sklearn-digits"))
    assert dataset.image_shape == (8, 8, 1) and dataset.class_names == data.DIGITS
    assert len(dataset.train_labels) + len(dataset.test_labels) == 1797
    assert len(dataset.test_labels) == 360  # a stratified fifth
    assert dataset.train_images.max() == 255  # ink levels 0-16 as bytes
    assert dataset.test_files_sha256


def test_the_model_follows_the_data():
    cnn = model.build_model(
        {
            "num_conv_blocks": 2,
            "image_height": 8,
            "image_width": 8,
            "image_channels": 3,
            "num_classes": 4,
        }
    )
    assert cnn.input_shape == (None, 8, 8, 3) and cnn.output_shape == (None, 4)
    with pytest.raises(ValueError, match="4 convolution blocks halve 8x8 images 4 times"):
        model.build_model({"num_conv_blocks": 4, "image_height": 8, "image_width": 8})


# Known datasets, downloaded from a file server on 127.0.0.1.


@pytest.fixture
def file_server(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 as the datasets' mirror."""
    served = tmp_path / "mirror"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DIGITUNE_DATASET_MIRROR", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield served, server
    server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def fashion_files(folder: Path, count: int = 60) -> dict[str, str]:
    """Fashion-MNIST-format files of random pictures; returns their MD5s."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(count, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (count // 2, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.arange(count // 2, dtype=np.uint8) % 10,
    }
    sums = {}
    for name, array in arrays.items():
        raw = gzip.compress(mnist.to_idx(array))
        (folder / name).write_bytes(raw)
        sums[name] = hashlib.md5(raw).hexdigest()  # noqa: S324 -- as published
    return sums


def test_a_known_dataset_is_downloaded_checked_and_cached(project, file_server, monkeypatch):
    served, server = file_server
    sums = fashion_files(served)
    original = published.PUBLISHED["fashion-mnist"]
    monkeypatch.setitem(
        published.PUBLISHED,
        "fashion-mnist",
        published.Published(original.base_url, sums, original.class_names),
    )
    dataset = data.load(settings(dataset="fashion-mnist"))
    assert dataset.train_images.shape == (60, 28, 28) and len(dataset.test_labels) == 30
    assert dataset.class_names[9] == "Ankle boot"
    assert sorted(p.name for p in (project / "data" / "fashion-mnist").iterdir()) == sorted(sums)
    server.shutdown()  # Cached: the second load needs no server.
    assert data.load(settings(dataset="fashion-mnist")).digest == dataset.digest


def test_a_download_that_does_not_match_the_published_checksum_is_refused(project, file_server):
    served, _ = file_server
    fashion_files(served)  # Not Zalando's files: their MD5s differ from the published ones.
    with pytest.raises(published.DownloadError) as error:
        data.load(settings(dataset="fashion-mnist"))
    message = str(error.value)
    assert "does not match its published checksum 8d4fb7e6c68d591d4c3dfef9ec88bf0d" in message
    assert "train-images-idx3-ubyte.gz" in message
    assert not (project / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()


def cifar_archive(path: Path, per_batch: int = 40) -> str:
    """A CIFAR-10-format archive (python pickles) of random pictures; returns its SHA-256."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {
                b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                b"labels": [int(i % 10) for i in range(per_batch)],
            }
            raw = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_cifar10_smoke_study_tunes_colour_pictures(project, file_server, monkeypatch):

    served, _ = file_server
    digest = cifar_archive(served / "cifar-10-python.tar.gz")
    original = published.PUBLISHED["cifar10"]
    monkeypatch.setitem(
        published.PUBLISHED,
        "cifar10",
        published.Published(
            original.base_url, {"cifar-10-python.tar.gz": digest}, original.class_names
        ),
    )
    outcome = optuna_search.run(_shipped("cifar10-quick.toml"), n_trials=1)
    assert outcome.model_name == "cifar10-cnn"
    version = mlflow.MlflowClient().get_model_version("cifar10-cnn", outcome.model_version)
    assert json.loads(version.tags["class_names"])[0] == "airplane"
    assert version.tags["dataset"] == "cifar10"
    loaded = mlflow.pyfunc.load_model(f"models:/cifar10-cnn/{outcome.model_version}")
    assert loaded.predict(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)


def _study(extra: str) -> str:
    return (
        '[study]\nname = "tiny"\nn_trials = 1\n\n[training]\nmax_epochs = 1\n'
        'precision = "float32"\n\n' + extra + "\n[space]\n"
        'learning_rate = { type = "float", low = 1e-3, high = 3e-3, log = true }\n'
        "dense_units = 32\n"
    )


def _shipped(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "studies" / name


@pytest.mark.slow
def test_a_folder_of_pictures_is_tuned_registered_promoted_and_served(project, capsys):
    from test_serve import png, started

    picture_folder(project / "pictures" / "Hand Written", per_class=60)
    study_file = write_study(
        project,
        TINY_STUDY.replace('name = "tiny"', 'name = "handwritten"').replace(
            "[space]", '[data]\nfolder = "pictures/Hand Written"\n\n[space]'
        ),
    )
    outcome = optuna_search.run(study_file, n_trials=2)

    # Registered under the folder's own model, with what serving needs to know.
    assert outcome.model_name == "hand-written-cnn"
    client = mlflow.MlflowClient()
    assert {m.name for m in client.search_registered_models()} == {"hand-written-cnn"}
    version = client.get_model_version("hand-written-cnn", outcome.model_version)
    assert json.loads(version.tags["class_names"]) == sorted(WORDS)
    assert version.tags["dataset"] == "hand-written"
    info = mlflow.models.get_model_info(f"models:/hand-written-cnn/{outcome.model_version}")
    assert info.metadata["class_names"] == sorted(WORDS)
    dataset = data.load(config.DataSettings(folder="pictures/Hand Written"))
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.params["data_test_files_sha256"] == dataset.test_files_sha256
    assert parent.data.params["data.folder"] == "pictures/Hand Written"
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {
        "hand-written-train",
        "hand-written-validation",
    }

    decision = promotion.promote(model_name="hand-written-cnn")
    assert decision.promoted and decision.challenger_evaluation.class_names == tuple(sorted(WORDS))
    assert len(decision.challenger_evaluation.confusion_matrix) == 10

    # The commands take --model; without it they name the models there are.
    assert cli.main(["models", "--model", "hand-written-cnn"]) == 0
    assert "@challenger, @champion" in capsys.readouterr().out
    assert cli.main(["models"]) == 1
    error = capsys.readouterr().err
    assert "no registered model 'mnist-cnn'" in error
    assert "(registered models: hand-written-cnn)" in error

    # Served: pictures resized (not prepared as MNIST was), answered with class names.
    reference = mlflow.pyfunc.load_model(f"models:/hand-written-cnn/{outcome.model_version}")
    pictures = np.asarray(dataset.test_images[:20])  # Read from the decoded folder.
    expected = np.asarray(reference.predict(data.preprocess(pictures)))
    app = serve.create_app("models:/hand-written-cnn@champion", poll_seconds=0)
    with started(app) as test_client:
        metadata = test_client.get("/metadata").json()
        assert metadata["class_names"] == sorted(WORDS) and metadata["input_shape"] == [28, 28, 1]
        assert metadata["digit_preparation"] is False
        right = 0
        for picture, probabilities, label in zip(
            pictures, expected, dataset.test_labels, strict=False
        ):
            answer = test_client.post(
                "/predict", files={"file": ("p.png", png(picture), "image/png")}
            ).json()["predictions"][0]
            assert answer["probabilities"] == pytest.approx(probabilities.tolist(), abs=1e-5)
            assert answer["class_name"] == dataset.class_names[answer["class_index"]]
            assert answer["digit"] is None
            right += answer["class_index"] == label
    assert right >= 12, f"{right} of 20 held-out pictures right (chance is 2)"


_REGISTERED = itertools.count()


def _register_as(dataset: data.Dataset, settings: config.DataSettings, alias: str) -> str:
    """An untrained CNN for `dataset`, registered into mnist-cnn with that dataset's tags as
    a new trial of a study would be; returns its version."""
    from digitune import registry, tracking

    params = {"num_filters": 4, "dense_units": 8, **dataset.params}
    client = tracking.configure(create=True)
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, "tasks")):
        version = registry.register(
            model.build_model(params),
            study_name="tasks",
            trial_number=next(_REGISTERED),
            params=params,
            validation_accuracy=0.5,
            test_accuracy=0.5,
            test_images=len(dataset.test_labels),
            data_sha256=dataset.digest,
            extra_tags=data.version_tags(dataset, settings),
            alias=alias,
        )
    return str(version.version)


@pytest.mark.slow
def test_a_champion_is_replaced_only_by_a_model_of_its_own_task(project):
    """The gate reads the champion's own tags: another dataset, other classes or another test
    set is refused, --force or not, and the aliases stay where they were."""
    from digitune import registry

    picture_folder(project / "words", per_class=12)
    digits_settings = config.DataSettings()
    champion = _register_as(data.load(digits_settings), digits_settings, "champion")
    client = mlflow.MlflowClient()

    def aliases() -> dict:
        found = client.get_registered_model("mnist-cnn").aliases
        return {alias: str(version) for alias, version in found.items()}

    words = config.DataSettings(folder="words")
    other_split = config.DataSettings(folder="words", test_fraction=0.3)
    challenger = _register_as(data.load(words), words, "challenger")
    for force in (False, True):
        with pytest.raises(registry.RegistryError) as refused:
            promotion.promote(force=force)
        assert str(refused.value).startswith(
            f"version {challenger} cannot replace the champion of 'mnist-cnn', version "
            f"{champion}: it learned words, the champion mnist. Nothing changed"
        )
        assert aliases() == {"champion": champion, "challenger": challenger}

    # Same dataset and classes, another held-out test set: not comparable either.
    client.delete_registered_model_alias("mnist-cnn", "champion")
    words_champion = _register_as(data.load(words), words, "champion")
    challenger = _register_as(data.load(other_split), other_split, "challenger")
    with pytest.raises(registry.RegistryError, match=r"its test set \(SHA-256 \w{12}\) is not"):
        promotion.promote()
    assert aliases() == {"champion": words_champion, "challenger": challenger}
    # The same test set is compared and promoted as ever.
    again = _register_as(data.load(words), words, "challenger")
    assert promotion.promote(force=True).challenger == again
    # A folder of the same name that lost a class: other classes.
    import shutil

    shutil.rmtree(project / "words" / "zero")
    fewer = _register_as(data.load(words), words, "challenger")
    with pytest.raises(
        registry.RegistryError, match="its classes are eight, five, four, nine, one"
    ):
        promotion.promote()
    assert aliases() == {"champion": again, "challenger": fewer}


@pytest.mark.slow
def test_a_study_naming_a_model_of_another_task_is_refused_before_training(project):
    digits_settings = config.DataSettings()
    _register_as(data.load(digits_settings), digits_settings, "champion")
    picture_folder(project / "words", per_class=12)
    study_file_path = write_study(
        project,
        TINY_STUDY.replace(
            "[space]", '[data]\nfolder = "words"\n\n[registry]\nmodel_name = "mnist-cnn"\n\n[space]'
        ),
    )
    with pytest.raises(ValueError) as refused:
        optuna_search.run(study_file_path)
    message = str(refused.value)
    assert message.startswith(f"{study_file_path} [registry]: registered model 'mnist-cnn' ")
    assert "version 1 learned mnist (0, 1, 2, 3, 4, 5, ... (10 classes))" in message
    assert "this study trains on words (eight, five, four, nine, one, seven, ..." in message
    assert "the default is words-cnn" in message
    assert not (project / "studies" / "tiny.db").exists()  # Nothing trained, nothing opened.
