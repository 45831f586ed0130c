"""What a study trains on, from its [data] table, and the split every trial sees.

    dataset = "mnist"            the default: `data.mnist`, verified against the published sums
    dataset = "sklearn-digits"   scikit-learn's 1,797 8x8 digits, inside its wheel (no download)
    dataset = "fashion-mnist"    Zalando's 70,000 28x28 clothes, fetched by Keras's `get_file`
    dataset = "cifar10"          70,000 32x32 colour pictures of 10 classes, likewise
    folder = "path/to/pictures"  one sub-folder per class, optionally inside train/ and test/

`SOURCES` names every dataset a study file can ask for and the function that loads it: to add
a dataset, write a function that returns a `Dataset` (`make` builds one from arrays) and add
it there. Downloads are checked against the published checksums and cached in
data/<dataset>/. A dataset without a test split of its own (a folder without test/,
sklearn-digits) holds one out once, stratified by class and seeded by `split_seed`; the
SHA-256 of its file list is logged with every study, so a changed test set shows. Validation
always comes from the training part (`split`): the test set is for the final model only.

A folder is decoded once into data/folders/ and read from there a batch at a time
(`pictures.Pictures`, in place of an array): memory stays flat however big it is.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable

import numpy as np

from digitune import config
from digitune.data import pictures
from digitune.data.pictures import Pictures

DIGITS = tuple(str(digit) for digit in range(10))
# The last sixth of the training images (10,000 of MNIST's 60,000) validates; the test set is
# kept for evaluating the final model only.
VALIDATION_FRACTION = 1 / 6


class DataError(ValueError):
    """A data file is missing, truncated, corrupted or not what was expected."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """uint8 images, (N, H, W) grey or (N, H, W, 3) colour, with int labels and class names.
    The images are arrays, or `Pictures` read from disk as they are needed (a folder's)."""

    name: str
    train_images: np.ndarray | Pictures
    train_labels: np.ndarray
    test_images: np.ndarray | Pictures
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    digest: str
    # True when the data are exactly the published files (or a folder, taken as it is).
    canonical: bool = True
    # The SHA-256 of the held-out test set's file list ("" when the dataset has its own).
    test_files_sha256: str = ""

    @functools.cached_property
    def test_digest(self) -> str:
        """The SHA-256 of the test set itself (pictures, labels, class names): two models are
        compared on the same test set exactly when their versions' `test_sha256` agree."""
        hashed = hashlib.sha256()
        for array in (self.test_images, self.test_labels):
            hashed.update(str(array.shape).encode())
            hash_array(hashed, array)
        hashed.update(json.dumps(list(self.class_names)).encode())
        return hashed.hexdigest()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        height, width = self.train_images.shape[1:3]
        return (height, width, 1 if self.train_images.ndim == 3 else self.train_images.shape[3])

    @property
    def params(self) -> dict[str, int]:
        """The data's part of every trial's params (`model.DATA_PARAMS`)."""
        height, width, channels = self.image_shape
        return {
            "image_height": height,
            "image_width": width,
            "image_channels": channels,
            "num_classes": len(self.class_names),
        }


@dataclasses.dataclass(frozen=True)
class Split:
    """Model-ready float32 images in [0, 1] of shape (N, H, W, C), arrays or `Pictures` read
    as they are needed, and int labels."""

    x_train: np.ndarray | Pictures
    y_train: np.ndarray
    x_validation: np.ndarray | Pictures
    y_validation: np.ndarray


def preprocess(images):
    """uint8 (N, 28, 28) images to float32 (N, 28, 28, 1) in [0, 1], as the tutorial does;
    colour pictures, (N, H, W, 3), keep their channels. `Pictures` are converted as they are
    read."""
    if isinstance(images, Pictures):
        return images.model_ready()
    images = images.astype("float32") / 255.0
    return images[..., np.newaxis] if images.ndim == 3 else images


def split(dataset: Dataset, train_images: int = 0, validation_images: int = 0) -> Split:
    """The tuning split: the first five sixths of the training images train, the last sixth
    validates; optionally only the first `train_images` / `validation_images` of each."""
    count = len(dataset.train_labels)
    boundary = count - round(count * VALIDATION_FRACTION)
    train_end = min(boundary, train_images) if train_images else boundary
    validation_end = min(count, boundary + validation_images) if validation_images else count
    return Split(
        x_train=preprocess(dataset.train_images[:train_end]),
        y_train=dataset.train_labels[:train_end].astype("int64"),
        x_validation=preprocess(dataset.train_images[boundary:validation_end]),
        y_validation=dataset.train_labels[boundary:validation_end].astype("int64"),
    )


def make(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names,
    source: str,
    canonical: bool = True,
    test_files_sha256: str = "",
    digest: str | None = None,
) -> Dataset:
    """A Dataset of (images, labels) pairs; its digest, unless given, hashes every array and
    the class names."""
    if digest is None:
        hashed = hashlib.sha256()
        for array in (*train, *test):
            hash_array(hashed, array)
        hashed.update(json.dumps(list(class_names)).encode())
        digest = hashed.hexdigest()
    return Dataset(
        name,
        train[0],
        np.asarray(train[1], np.int64),
        test[0],
        np.asarray(test[1], np.int64),
        tuple(class_names),
        source,
        digest,
        canonical,
        test_files_sha256,
    )


def hash_array(hashed, array) -> None:
    """Feed an array's bytes, or a `Pictures`' a chunk at a time, to the hash `hashed`."""
    for chunk in pictures.chunks(array):
        hashed.update(np.ascontiguousarray(chunk).data)


def held_out(names: list[str], labels: np.ndarray, settings: config.DataSettings, source):
    """Training and test indices, stratified by class and seeded, with the SHA-256 of the
    test set's names. The training part is shuffled too, so its last sixth validates."""
    from sklearn.model_selection import train_test_split

    try:
        train, test = train_test_split(
            np.arange(len(labels)),
            test_size=settings.test_fraction,
            stratify=labels,
            random_state=settings.split_seed,
        )
    except ValueError as error:  # too few pictures of some class to stratify
        raise DataError(
            f"{source}: {len(labels)} pictures of {len(set(labels.tolist()))} classes are too "
            f"few to hold out {settings.test_fraction:.0%} of each class as the test set "
            f"({error}); add pictures, or give train/ and test/ folders"
        ) from None
    listing = "\n".join(sorted(names[index] for index in test))
    return train, np.sort(test), hashlib.sha256(listing.encode()).hexdigest()


def load(settings: config.DataSettings) -> Dataset:
    """The dataset a study's [data] table names, fetched and verified first if need be."""
    if settings.folder:
        return folder.load(settings)
    return SOURCES[settings.dataset](settings)


def version_tags(dataset: Dataset, settings: config.DataSettings) -> dict[str, str]:
    """What a registered version says of its data: the dataset, its class names (which
    serving answers with), and the [data] settings that `from_spec` reloads it from."""
    return {
        "dataset": dataset.name,
        "class_names": json.dumps(list(dataset.class_names)),
        "data_spec": json.dumps(dataclasses.asdict(settings), sort_keys=True),
        "test_sha256": dataset.test_digest,
    }


def from_spec(text: str | None) -> Dataset:
    """The dataset a registered version was trained on, from its `data_spec` tag (MNIST for
    versions registered before [data] existed)."""
    if not text:
        return load(config.DataSettings())
    return load(config.DataSettings(**json.loads(text)))


# The sources import the types above.
from digitune.data import folder, mnist, published  # noqa: E402

# Every dataset a study file's [data] `dataset` can name, and what loads it.
SOURCES: dict[str, Callable[[config.DataSettings], Dataset]] = {
    "mnist": mnist.dataset,
    "fashion-mnist": published.fashion_mnist,
    "cifar10": published.cifar10,
    "sklearn-digits": published.sklearn_digits,
}
