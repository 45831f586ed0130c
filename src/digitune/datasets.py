"""What a study trains on, from its [data] table: MNIST, a known dataset, or a folder of pictures.

    dataset = "mnist"            the default: `digitune.data`, exactly as before
    dataset = "sklearn-digits"   scikit-learn's 1,797 8x8 digits, inside its wheel (no download)
    dataset = "fashion-mnist"    Zalando's 70,000 28x28 clothes, fetched by Keras's `get_file`
    dataset = "cifar10"          70,000 32x32 colour pictures of 10 classes, likewise
    folder = "path/to/pictures"  one sub-folder per class, optionally inside train/ and test/

Downloads (`digitune.download`) come from the datasets' published addresses (or
DIGITUNE_DATASET_MIRROR), are checked against the published checksums and cached in
data/<dataset>/. A dataset without a test split of its own (a folder without test/,
sklearn-digits) holds one out once, stratified by class and seeded by `split_seed`; the SHA-256
of its file list is logged with every study, so a changed test set shows. Validation always
comes from the training part.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

from digitune import config, data, download, evaluate, imaging

DIGITS = evaluate.DIGITS
PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# Pillow modes that hold no colour.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


@dataclasses.dataclass(frozen=True)
class Dataset:
    """uint8 images, (N, H, W) grey or (N, H, W, 3) colour, with int labels and class names."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    digest: str
    # True when the data are exactly the published files (or a folder, taken as it is).
    canonical: bool = True
    # The SHA-256 of the held-out test set's file list ("" when the dataset has its own).
    test_files_sha256: str = ""

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


def load(settings: config.DataSettings) -> Dataset:
    """The dataset a study's [data] table names, fetched and verified first if need be."""
    if settings.folder:
        return load_pictures(settings)
    if settings.dataset == "mnist":
        mnist = data.load()
        return Dataset(
            "mnist", mnist.train_images, mnist.train_labels, mnist.test_images,
            mnist.test_labels, DIGITS, str(mnist.source), mnist.digest, mnist.canonical,
        )  # fmt: skip
    if settings.dataset == "sklearn-digits":
        return _sklearn_digits(settings)
    files = download.fetch(settings.dataset)
    if settings.dataset == "cifar10":
        arrays = download.read_cifar(files["cifar-10-python.tar.gz"])
    else:
        arrays = [
            data.parse_idx(gzip.decompress(path.read_bytes()), path) for path in files.values()
        ]
    return _dataset(settings.dataset, *arrays, download.PUBLISHED[settings.dataset].class_names,
                    str(next(iter(files.values())).parent))  # fmt: skip


def _sklearn_digits(settings: config.DataSettings) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0-16 ink levels, as 0-255 bytes like every other dataset.
    images = np.round(digits.images * 255 / 16).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    names = [f"{index}" for index in range(len(labels))]
    train, test, test_sha256 = held_out(names, labels, settings, "sklearn-digits")
    return _dataset(
        "sklearn-digits", images[train], labels[train], images[test], labels[test], DIGITS,
        "sklearn.datasets.load_digits", test_files_sha256=test_sha256,
    )  # fmt: skip


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
        raise data.DataError(
            f"{source}: {len(labels)} pictures of {len(set(labels.tolist()))} classes are too "
            f"few to hold out {settings.test_fraction:.0%} of each class as the test set "
            f"({error}); add pictures, or give train/ and test/ folders"
        ) from None
    listing = "\n".join(sorted(names[index] for index in test))
    return train, np.sort(test), hashlib.sha256(listing.encode()).hexdigest()


def load_pictures(settings: config.DataSettings) -> Dataset:
    """A folder of pictures: <folder>/<class>/*.png, or <folder>/train/<class>/ and
    <folder>/test/<class>/; every error names the path."""
    root = Path(settings.folder).expanduser()
    root = root if root.is_absolute() else config.project_dir() / root
    if not root.is_dir():
        raise data.DataError(f"{root}: no such folder of pictures ([data] folder)")
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split else root
    classes = tuple(sorted(path.name for path in train_root.iterdir() if path.is_dir()))
    if len(classes) < 2:
        raise data.DataError(
            f"{train_root}: found {len(classes)} class folder(s); a classifier needs at least "
            "2 sub-folders of pictures, one per class"
        )
    files, labels = _listing(train_root, classes)
    images = _read_pictures(files, settings.color_mode, settings.image_size)
    if split:
        test_files, test_labels = _listing(root / "test", classes)
        # In the training pictures' colour mode, as "auto" settled it.
        mode = "rgb" if images.ndim == 4 else "grayscale"
        test_images = _read_pictures(test_files, mode, settings.image_size)
        if test_images.shape[1:] != images.shape[1:]:
            raise data.DataError(f"{root / 'test'}: pictures of another size than train/'s")
        order = np.random.default_rng(settings.split_seed).permutation(len(labels))
        return _dataset(settings.name, images[order], labels[order], test_images, test_labels,
                        classes, str(root), canonical=True)  # fmt: skip
    names = [str(path.relative_to(root)) for path in files]
    train, test, test_sha256 = held_out(names, labels, settings, root)
    return _dataset(settings.name, images[train], labels[train], images[test], labels[test],
                    classes, str(root), test_files_sha256=test_sha256)  # fmt: skip


def _listing(folder: Path, classes: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(classes):
        pictures = sorted(
            path for path in (folder / name).glob("*") if path.suffix.lower() in PICTURE_SUFFIXES
        )
        if not pictures:
            raise data.DataError(
                f"{folder / name}: no pictures (expected {', '.join(sorted(PICTURE_SUFFIXES))})"
            )
        files += pictures
        labels += [label] * len(pictures)
    return files, np.asarray(labels, np.int64)


def _read_pictures(files: list[Path], color_mode: str, size: int) -> np.ndarray:
    """Every picture decoded once: (N, H, W) grey or (N, H, W, 3) RGB as `color_mode` says;
    "auto" gives grey when no picture has colour, else RGB (a grey picture repeated in the
    three channels, as Pillow converts it)."""
    from PIL import Image

    images, first = [], None
    for path in files:
        with _opened(path, Image) as picture:
            grey = color_mode == "grayscale" or (
                color_mode == "auto" and picture.mode in _GREY_MODES
            )
            picture = picture.convert("L" if grey else "RGB")
            if size:
                picture = picture.resize((size, size), Image.Resampling.BILINEAR)
            first = first or (picture.size, path)
            if picture.size != first[0]:
                raise data.DataError(
                    f"{path}: {picture.size[0]}x{picture.size[1]} pixels, but {first[1]} has "
                    f"{first[0][0]}x{first[0][1]}; set [data] image_size to resize them all"
                )
            images.append(np.asarray(picture, np.uint8))
    if any(image.ndim == 3 for image in images):
        images = [
            image if image.ndim == 3 else np.repeat(image[..., None], 3, 2) for image in images
        ]
    return np.stack(images)


def _opened(path: Path, image_module):
    try:
        picture = image_module.open(path)
        picture.load()
    except Exception as error:  # noqa: BLE001 -- Pillow raises many kinds for a bad file.
        raise data.DataError(f"{path}: not a readable picture ({error})") from None
    if picture.width * picture.height > imaging.MAX_PIXELS:
        raise data.DataError(f"{path}: {picture.width}x{picture.height} pixels is too big")
    return picture


def _dataset(name, train_images, train_labels, test_images, test_labels, class_names,
             source, canonical=True, test_files_sha256="") -> Dataset:  # fmt: skip
    digest = hashlib.sha256()
    for array in (train_images, train_labels, test_images, test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps(list(class_names)).encode())
    return Dataset(
        name, train_images, np.asarray(train_labels, np.int64), test_images,
        np.asarray(test_labels, np.int64), tuple(class_names), source, digest.hexdigest(),
        canonical, test_files_sha256,
    )  # fmt: skip


def version_tags(dataset: Dataset, settings: config.DataSettings) -> dict[str, str]:
    """What a registered version says of its data: the dataset, its class names (which
    serving answers with), and the [data] settings that `from_spec` reloads it from."""
    return {
        "dataset": dataset.name,
        "class_names": json.dumps(list(dataset.class_names)),
        "data_spec": json.dumps(dataclasses.asdict(settings), sort_keys=True),
    }


def from_spec(text: str | None) -> Dataset:
    """The dataset a registered version was trained on, from its `data_spec` tag (MNIST for
    versions registered before [data] existed)."""
    if not text:
        return load(config.DataSettings())
    return load(config.DataSettings(**json.loads(text)))
