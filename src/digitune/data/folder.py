"""A folder of pictures as a dataset: <folder>/<class>/*.png, or <folder>/train/<class>/ and
<folder>/test/<class>/. Every picture is decoded once, checked and resized as [data] says;
every error names the path.

The decoded pixels go to data/folders/<name>-<key>/ in the project, as .npy files in the
order training reads them, and the dataset reads them from there a batch at a time
(`data.pictures`): memory stays flat however many pictures the folder holds. The key hashes
the folder's path, [data]'s settings and every file's name, size and modification time, so
a changed folder is decoded again; a study that finds its key decodes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from digitune import config, data, preprocessing
from digitune.data.pictures import Pictures

log = logging.getLogger(__name__)

PICTURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
# The only readers Pillow may use on a folder's files, whatever their names say: no plugin
# that hands a file to another program (EPS to Ghostscript) or parses a rarer format. A GIF
# gives its first frame.
FORMATS = ("PNG", "JPEG", "BMP", "GIF")
# Pillow modes that hold no colour.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# Pictures decoded before they are written out together.
WRITE_ROWS = 1024
# Part of every cache key: a new layout of the decoded files gets new folders.
LAYOUT = "1"


class _Colour(Exception):
    """A colour picture among grey ones, with colour_mode "auto": decode them all as RGB."""


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
    if split:
        test_files, test_labels = _listing(root / "test", classes)
        order = np.random.default_rng(settings.split_seed).permutation(len(labels))
        train, test, test_sha256 = (files, order), (test_files, np.arange(len(test_files))), ""
        labels = (labels[order], test_labels)
    else:
        names = [str(path.relative_to(root)) for path in files]
        train, test, test_sha256 = data.held_out(names, labels, settings, root)
        train, test, labels = (files, train), (files, test), (labels[train], labels[test])
    key = _key(root, settings, [*train[0], *(test[0] if split else [])])
    cache = config.project_dir() / "data" / "folders" / f"{settings.name}-{key[:16]}"
    if not _complete(cache, key):
        _decode(cache, key, root, settings, train, test, labels, test_sha256, classes)
    meta = json.loads((cache / "meta.json").read_text())
    return data.make(
        settings.name,
        (Pictures(cache / "train.npy"), np.load(cache / "train_labels.npy")),
        (Pictures(cache / "test.npy"), np.load(cache / "test_labels.npy")),
        classes,
        str(root),
        test_files_sha256=meta["test_files_sha256"],
        digest=meta["digest"],
    )


def _key(root: Path, settings: config.DataSettings, files: list[Path]) -> str:
    """What the decoded pictures depend on: the folder, [data]'s settings, every file."""
    hashed = hashlib.sha256(f"{LAYOUT}\n{root.resolve()}\n".encode())
    hashed.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for path in files:
        stat = path.stat()
        hashed.update(f"\n{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return hashed.hexdigest()


def _complete(cache: Path, key: str) -> bool:
    """Whether `cache` holds every decoded file for `key` (meta.json is written last), each
    as long as its header says."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads((cache / "meta.json").read_text()).get("key") != key:
            return False
        for part in ("train", "train_labels", "test", "test_labels"):
            np.load(cache / f"{part}.npy", mmap_mode="r")  # ValueError when cut short.
        return True
    return False


def _decode(cache, key, root, settings, train, test, labels, test_sha256, classes) -> None:
    """Decode the training pictures (`train`: files and the rows to take, in order) and the
    test pictures into a new folder, then move it to `cache` whole: a study that stops
    halfway, or another process decoding the same folder, leaves no half-written cache."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "decoding %d pictures of %s once, into %s", len(labels[0]) + len(labels[1]), root, cache
    )
    scratch = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache.parent))
    try:
        mode = settings.color_mode
        while True:
            try:
                first = _write(scratch / "train.npy", train, mode, settings.image_size)
                if test_sha256:  # Held out of one folder: read as the training pictures.
                    _write(scratch / "test.npy", test, mode, settings.image_size, first)
                else:  # In the training pictures' colour mode, as "auto" settled it.
                    grey = np.load(scratch / "train.npy", mmap_mode="r").ndim == 3
                    test_mode = "grayscale" if grey else "rgb"
                    _write(scratch / "test.npy", test, test_mode, settings.image_size)
                break
            except _Colour:
                mode = "auto-rgb"
        train_frame = np.load(scratch / "train.npy", mmap_mode="r").shape[1:]
        if np.load(scratch / "test.npy", mmap_mode="r").shape[1:] != train_frame:
            raise data.DataError(f"{root / 'test'}: pictures of another size than train/'s")
        np.save(scratch / "train_labels.npy", labels[0])
        np.save(scratch / "test_labels.npy", labels[1])
        hashed = hashlib.sha256()  # As `data.make` hashes arrays: the same digest.
        for part in ("train", "train_labels", "test", "test_labels"):
            path = scratch / f"{part}.npy"
            data.hash_array(hashed, np.load(path) if part.endswith("labels") else Pictures(path))
        hashed.update(json.dumps(list(classes)).encode())
        meta = {"key": key, "digest": hashed.hexdigest(), "test_files_sha256": test_sha256}
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(scratch, cache)
        except OSError:  # Another process decoded the same folder first, or a stale one.
            if not _complete(cache, key):
                shutil.rmtree(cache, ignore_errors=True)
                os.replace(scratch, cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def _write(target: Path, part, color_mode: str, size: int, first=None):
    """Decode the pictures `part` names (files, and which of them in what order) into the
    .npy file `target`, WRITE_ROWS at a time: (N, H, W) grey or (N, H, W, 3) RGB as
    `color_mode` says. "auto" gives grey, or raises _Colour at the first colour picture;
    "auto-rgb" then repeats a grey picture in the three channels, as Pillow converts it.
    Every picture must have the size of `first` (a size and the path that had it), or of
    the first one; returns that."""
    from PIL import Image

    files, rows = part
    rows_written, pending = 0, []
    with open(target, "wb") as handle:
        for row in rows:
            path = files[row]
            with _opened(path, Image) as picture:
                grey = color_mode == "grayscale" or (
                    color_mode.startswith("auto") and picture.mode in _GREY_MODES
                )
                if color_mode == "auto" and not grey:
                    raise _Colour
                picture = picture.convert("L" if grey else "RGB")
                if size:
                    picture = picture.resize((size, size), Image.Resampling.BILINEAR)
                first = first or (picture.size, path)
                if picture.size != first[0]:
                    raise data.DataError(
                        f"{path}: {picture.size[0]}x{picture.size[1]} pixels, but {first[1]} "
                        f"has {first[0][0]}x{first[0][1]}; set [data] image_size to resize them all"
                    )
                pixels = np.asarray(picture, np.uint8)
            if color_mode == "auto-rgb" and pixels.ndim == 2:
                pixels = np.repeat(pixels[..., None], 3, 2)
            if not rows_written and not pending:
                header = {
                    "descr": "|u1",
                    "fortran_order": False,
                    "shape": (len(rows), *pixels.shape),
                }
                np.lib.format.write_array_header_1_0(handle, header)
            pending.append(pixels)
            if len(pending) == WRITE_ROWS:
                handle.write(np.stack(pending).tobytes())
                rows_written, pending = rows_written + len(pending), []
        if pending:
            handle.write(np.stack(pending).tobytes())
    return first


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
