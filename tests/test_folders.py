"""Folders of any size: decoded once into the project's data/folders/, then read a batch at a
time by the trainer, the evaluation and the registry."""

from __future__ import annotations

import logging

import mlflow
import numpy as np
from PIL import Image

from conftest import TINY_STUDY, write_study
from digitune import config, data, deployment, ensemble, evaluate, loader, promotion, trainer
from digitune.data import pictures
from digitune.data.pictures import Pictures
from digitune.engines import optuna_search
from test_datasets import picture_folder


def test_a_folder_is_decoded_once_and_again_when_it_changes(project, caplog):
    caplog.set_level(logging.INFO, logger="digitune.data.folder")
    root = picture_folder(project / "digits", per_class=12)
    settings = config.DataSettings(folder=str(root))
    dataset = data.load(settings)
    assert isinstance(dataset.train_images, Pictures) and dataset.train_images.shape[1:] == (28, 28)

    # Each picture as Pillow reads it from disk, in the order of the seeded hold-out.
    files = sorted(root.glob("*/*.png"), key=lambda path: (path.parent.name, path.name))
    labels = np.asarray(
        [sorted(p.name for p in root.iterdir()).index(f.parent.name) for f in files]
    )
    names = [str(path.relative_to(root)) for path in files]
    train, test, _ = data.held_out(names, labels, settings, root)
    on_disk = np.stack([np.asarray(Image.open(path)) for path in files])
    assert np.array_equal(np.asarray(dataset.train_images), on_disk[train])
    assert np.array_equal(np.asarray(dataset.test_images), on_disk[test])
    assert np.array_equal(dataset.test_labels, labels[test])
    # Model-ready as arrays are: float32 in [0, 1] with a channel axis, a batch at a time.
    ready = data.split(dataset).x_validation
    assert np.array_equal(ready[[3, 0]], data.preprocess(on_disk[train][-len(ready) :][[3, 0]]))

    # Found again: nothing decoded, the same digest.
    assert sum("decoding 120 pictures" in r.message for r in caplog.records) == 1
    again = data.load(settings)
    assert again.digest == dataset.digest
    assert sum("decoding" in r.message for r in caplog.records) == 1
    # A new picture changes the folder: decoded again, another digest.
    Image.fromarray(on_disk[0]).save(root / files[0].parent.name / "new.png")
    changed = data.load(settings)
    assert changed.digest != dataset.digest
    assert len(changed.train_labels) + len(changed.test_labels) == 121
    assert len(list((project / "data" / "folders").iterdir())) == 2
    # A cache cut short (a full disk, a copy gone wrong) is decoded again, not trusted.
    cache = next(
        p for p in (project / "data" / "folders").iterdir() if p.name != folder_of(dataset)
    )
    (cache / "train.npy").write_bytes((cache / "train.npy").read_bytes()[:-100])
    assert data.load(settings).digest == changed.digest
    assert sum("decoding" in r.message for r in caplog.records) == 3


def folder_of(dataset: data.Dataset) -> str:
    return dataset.train_images.path.parent.name


def test_a_folder_study_reads_its_pictures_a_batch_at_a_time(project, monkeypatch):
    """Trials train and validate, the best model is tested and refitted, and then promoted,
    ensembled and exported, without ever reading more of the folder at once than a batch:
    memory does not grow with the folder."""
    picture_folder(project / "digits", per_class=40)
    monkeypatch.setattr(pictures, "CHUNK_ROWS", 64)
    monkeypatch.setattr(trainer, "VALIDATION_BATCH_SIZE", 64)
    # Fixed counts, whatever the folder's size; smaller than its parts here.
    for module, name in [
        (deployment, "CALIBRATION_IMAGES"),
        (deployment, "INTERPRETER_BATCH"),
        (loader, "PREDICT_BATCH"),
        (ensemble, "BATCH"),
    ]:
        monkeypatch.setattr(module, name, 64)
    reads = []
    whole, rows = Pictures.__array__, Pictures.__getitem__

    def read_whole(self, *args, **kwargs):
        reads.append(len(self))
        return whole(self, *args, **kwargs)

    def read_rows(self, key):
        if not isinstance(key, slice):
            reads.append(np.size(key))
        return rows(self, key)

    monkeypatch.setattr(Pictures, "__array__", read_whole)
    monkeypatch.setattr(Pictures, "__getitem__", read_rows)
    study = TINY_STUDY.replace("[space]", '[data]\nfolder = "digits"\n\n[space]')
    study_path = write_study(project, study)
    outcome = optuna_search.run(study_path, n_trials=2, refit_best=True)
    promotion.promote(model_name=outcome.model_name)
    ensemble.run(study_path, top=2)
    table = deployment.export(model_name=outcome.model_name).set_index("format")
    dataset = data.load(config.DataSettings(folder="digits"))
    assert reads and max(reads) <= 64 < len(dataset.train_labels)
    assert table.loc["TFLite float32", "test_accuracy"] > 0.5

    # The registered test accuracy is the one a whole read of the test set gives.
    monkeypatch.undo()
    version = mlflow.MlflowClient().get_model_version(outcome.model_name, "1")
    network = loader.load(version)
    probabilities = network.predict(data.preprocess(np.asarray(dataset.test_images)))
    expected = evaluate.from_probabilities(probabilities, dataset.test_labels).accuracy
    assert version.tags["test_accuracy"] == f"{expected:.4f}"
