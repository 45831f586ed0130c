"""Datasets as their publishers ship them: scikit-learn's digits (inside its wheel), and
Fashion-MNIST and CIFAR-10, whose published files are fetched through Keras's `get_file`,
checked against the published checksums as they arrive and cached in data/<name>/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np

from digitune import config, data
from digitune.data import mnist

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download source is not available here, or sent something else than published."""


@dataclasses.dataclass(frozen=True)
class Published:
    """A known dataset's published files: where, their checksums, and how to read them."""

    base_url: str
    checksums: dict[str, str]  # file name: MD5 or SHA-256 as published
    class_names: tuple[str, ...]


PUBLISHED = {
    # MD5s from Zalando's README; Keras hosts the same files.
    "fashion-mnist": Published(
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
        + ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
    # The SHA-256 Keras's own loader checks.
    "cifar10": Published(
        "https://www.cs.toronto.edu/~kriz/",
        {
            "cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f3"
            "9262c83c16fe9348329d7fe0b5c001ce"
        },
        ("airplane", "automobile", "bird", "cat", "deer")
        + ("dog", "frog", "horse", "ship", "truck"),
    ),
}


def fetch(name: str) -> dict[str, Path]:
    """A known dataset's files in data/<name>/, downloaded and checked as need be."""
    import keras

    published = PUBLISHED[name]
    base_url = config.dataset_mirror() or published.base_url
    cache = config.project_dir() / "data"
    # Keras caches under ~/.keras instead of a folder that does not exist yet.
    (cache / name).mkdir(parents=True, exist_ok=True)
    paths = {}
    for file_name, checksum in published.checksums.items():
        origin = base_url.rstrip("/") + "/" + file_name
        if not (cache / name / file_name).exists():
            log.info("downloading %s from %s", file_name, origin)
        try:
            # Keras draws a progress bar on stdout for every file; one log line says it.
            with contextlib.redirect_stdout(io.StringIO()):
                path = keras.utils.get_file(
                    file_name, origin, file_hash=checksum, cache_dir=str(cache), cache_subdir=name
                )
        except ValueError as error:  # Keras's "Incomplete or corrupted file detected"
            (cache / name / file_name).unlink(missing_ok=True)
            raise DownloadError(
                f"{origin}: the downloaded {file_name} does not match its published checksum "
                f"{checksum}; it was deleted ({error})"
            ) from None
        except Exception as error:  # noqa: BLE001 -- no network, refused, not found, ...
            raise DownloadError(
                f"could not download {name}'s {file_name} from {origin}: {error}. Put the "
                f"published file in {cache / name}/, or set DIGITUNE_DATASET_MIRROR"
            ) from None
        paths[file_name] = Path(path)
    return paths


def read_cifar(archive: Path) -> list[np.ndarray]:
    """CIFAR-10's python archive: five training batches and a test batch (pickled dicts of
    3,072-byte rows, red then green then blue planes)."""
    parts: dict[str, tuple] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            stem = Path(member.name).name
            if stem.startswith(("data_batch_", "test_batch")):
                batch = pickle.load(tar.extractfile(member), encoding="bytes")  # noqa: S301 -- checked
                images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
                parts[stem] = (images.transpose(0, 2, 3, 1), np.asarray(batch[b"labels"]))
    training = [parts[key] for key in sorted(parts) if key.startswith("data_batch_")]
    if not training or "test_batch" not in parts:
        raise DownloadError(f"{archive}: no data_batch_* or test_batch inside; not CIFAR-10")
    return [
        np.concatenate([images for images, _ in training]),
        np.concatenate([labels for _, labels in training]),
        *parts["test_batch"],
    ]


def fashion_mnist(settings: config.DataSettings) -> data.Dataset:
    files = fetch("fashion-mnist")
    arrays = [mnist.parse_idx(gzip.decompress(path.read_bytes()), path) for path in files.values()]
    return _published("fashion-mnist", arrays, files)


def cifar10(settings: config.DataSettings) -> data.Dataset:
    files = fetch("cifar10")
    return _published("cifar10", read_cifar(files["cifar-10-python.tar.gz"]), files)


def _published(name: str, arrays: list[np.ndarray], files: dict[str, Path]) -> data.Dataset:
    train_images, train_labels, test_images, test_labels = arrays
    return data.make(
        name,
        (train_images, train_labels),
        (test_images, test_labels),
        PUBLISHED[name].class_names,
        str(next(iter(files.values())).parent),
    )


def sklearn_digits(settings: config.DataSettings) -> data.Dataset:
    """scikit-learn's 1,797 8x8 digits, with a stratified, seeded test set held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0-16 ink levels, as 0-255 bytes like every other dataset.
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    names = [f"{index}" for index in range(len(labels))]
    train, test, test_sha256 = data.held_out(names, labels, settings, "sklearn-digits")
    return data.make(
        "sklearn-digits",
        (images[train], labels[train]),
        (images[test], labels[test]),
        data.DIGITS,
        "sklearn.datasets.load_digits",
        test_files_sha256=test_sha256,
    )
