"""A folder of pictures as a dataset: <folder>/<class>/*.png, or <folder>/train/<class>/ and
<folder>/test/<class>/. Every picture is decoded once, checked and resized as [data] says;
every error names the path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from digitune import config, data, preprocessing

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
# The only readers Pillow may use on a folder's files, whatever their names say: no plugin
# that hands a file to another program (EPS to Ghostscript) or parses a rarer format. A GIF
# gives its first frame.
FORMATS = ("PNG", "JPEG", "BMP", "GIF")
# Pillow modes that hold no colour.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def load(settings: config.DataSettings) -> data.Dataset:
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
        return data.make(
            settings.name,
            (images[order], labels[order]),
            (test_images, test_labels),
            classes,
            str(root),
        )
    names = [str(path.relative_to(root)) for path in files]
    train, test, test_sha256 = data.held_out(names, labels, settings, root)
    return data.make(
        settings.name,
        (images[train], labels[train]),
        (images[test], labels[test]),
        classes,
        str(root),
        test_files_sha256=test_sha256,
    )


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
    """The picture at `path`, its size checked from its header before it is decoded."""
    formats = "/".join(FORMATS)
    try:
        picture = image_module.open(path, formats=FORMATS)
    except Exception as error:  # noqa: BLE001 -- Pillow raises many kinds for a bad file.
        raise data.DataError(f"{path}: not a readable {formats} picture ({error})") from None
    if picture.width * picture.height > preprocessing.MAX_PIXELS:
        picture.close()
        raise data.DataError(
            f"{path}: {picture.width}x{picture.height} pixels is too big (the limit is "
            f"{preprocessing.MAX_PIXELS:,} pixels)"
        )
    try:
        picture.load()
    except Exception as error:  # noqa: BLE001
        picture.close()
        raise data.DataError(f"{path}: not a readable {formats} picture ({error})") from None
    return picture
