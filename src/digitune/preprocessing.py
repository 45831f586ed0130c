"""How a picture a user sends becomes a model's input: serving's preprocessing.

`images_from` turns a request's body (a PNG or JPEG upload, or JSON arrays) into a batch of
the served model's images. A picture of a digit becomes an MNIST-like 28x28 image
(`prepare`); any other picture is resized to the model's input (`fit`).

MNIST's digits were size-normalised to fit a 20x20 box (keeping their aspect ratio) and
placed in a 28x28 image so that their centre of mass sits at the centre, white ink on black.
A digit drawn on a page or photographed is nothing like that, and a CNN trained on MNIST
misreads it unless it is prepared the same way: greyscale, inverted when the background is
light, cropped to the ink, scaled to fit 20x20, and centred by mass.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, PngImagePlugin

SIZE = 28
DIGIT_BOX = 20
# The most pixels a picture may have: a 16-megapixel photo. Checked from the header, before
# anything is decoded, so a small file that claims a huge image costs nothing.
MAX_PIXELS = 4096 * 4096
# Compressed text and colour-profile chunks of a PNG inflate to at most this much in all
# (Pillow's defaults allow 64 MB per picture).
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
# Pillow's readers tried on an upload. Phones and cameras save JPEGs as MPO (several pictures
# in one file, the first being the photo), which the JPEG reader opens too.
FORMATS = ("PNG", "JPEG")
# The most images one request may hold.
MAX_BATCH = 256
# Pixels at least this bright (on a 0-1 scale, after inversion) count as ink when cropping.
INK_THRESHOLD = 0.2


class ImageError(ValueError):
    """The input is not an image of a digit that can be prepared."""


def decode(data: bytes, colour: bool = False) -> np.ndarray:
    """Decode PNG or JPEG bytes into a float greyscale array in [0, 1] (0 = black), or with
    `colour` an (H, W, 3) RGB one.

    Transparent pixels are laid on white first: a canvas exported as PNG has a transparent
    background, which is the paper, not ink.
    """
    if not data:
        raise ImageError("the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"the picture is {width}x{height} pixels; the limit is {MAX_PIXELS:,} "
                    "pixels (a 16-megapixel photo): send a smaller one"
                )
            if image.format in ("JPEG", "MPO") and min(width, height) >= 512:
                # JPEG decodes at 1/2 to 1/8 scale for almost nothing: a photo's digit is
                # still far bigger than 28x28 after it.
                scale = min(8, min(width, height) // 256)
                image.draft("RGB" if colour else "L", (width // scale, height // scale))
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(paper, rgba)
            grey = image.convert("RGB" if colour else "L")
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 -- Pillow's readers raise many kinds on bad bytes.
        raise ImageError(f"not a readable PNG or JPEG image ({error})") from None
    return np.asarray(grey, dtype=np.float32) / 255.0


def prepare(image: np.ndarray) -> np.ndarray:
    """An MNIST-like (28, 28) float32 image in [0, 1] from a greyscale image in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageError(f"expected a 2-D greyscale image, got shape {image.shape}")
    # The background is what the border mostly is; MNIST has white ink on black.
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    if np.median(border) > 0.5:
        image, border = 1.0 - image, 1.0 - border
    # A grey paper is not ink: subtract the background level.
    image = np.clip(image - np.median(border), 0.0, None)
    if image.max() <= 0:
        raise ImageError("the image is blank: no ink was found")
    image = image / image.max()

    rows = np.flatnonzero((image >= INK_THRESHOLD).any(axis=1))
    columns = np.flatnonzero((image >= INK_THRESHOLD).any(axis=0))
    digit = image[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]

    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(
        Image.fromarray(digit, mode="F").resize(new_size, Image.Resampling.LANCZOS),
        dtype=np.float32,
    )
    digit = np.clip(digit, 0.0, 1.0)

    # Place the digit so that its centre of mass falls on (14, 14), as in MNIST.
    total = digit.sum()
    row_mass = (digit.sum(axis=1) * np.arange(digit.shape[0])).sum() / total
    column_mass = (digit.sum(axis=0) * np.arange(digit.shape[1])).sum() / total
    top = int(np.clip(round(SIZE / 2 - row_mass), 0, SIZE - digit.shape[0]))
    left = int(np.clip(round(SIZE / 2 - column_mass), 0, SIZE - digit.shape[1]))
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return canvas


def fit(image: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A picture in [0, 1], (H, W) or (H, W, 3), resized to a model's (height, width,
    channels) input: how pictures are prepared for models of other things than MNIST's
    digits, which were trained on pictures resized the same way."""
    height, width, channels = shape
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and channels == 1:
        array = array.mean(axis=2)
    planes = [array] if array.ndim == 2 else [array[..., index] for index in range(3)]
    if array.shape[:2] != (height, width):
        planes = [
            np.asarray(
                Image.fromarray(plane, mode="F").resize((width, height), Image.Resampling.BILINEAR)
            )
            for plane in planes
        ]
    if channels == 3 and len(planes) == 1:
        planes = planes * 3
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0).astype(np.float32)


def from_array(values: object, shape: tuple[int, int, int] = (SIZE, SIZE, 1)) -> np.ndarray:
    """An (H, W, C) float32 image in [0, 1] from a nested list of 0-255 or 0-1 numbers, of
    the model's shape ((28, 28) or (28, 28, 1) for MNIST's).

    Such an array is taken to be prepared already, as MNIST's own images are.
    """
    height, width, channels = shape
    words = f"{height}x{width}" + (f"x{channels}" if channels > 1 else "")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ImageError(f"the image must be a {words} array of numbers") from None
    if channels == 1 and array.shape == (height, width):
        array = array[..., np.newaxis]
    if array.shape != (height, width, channels):
        raise ImageError(f"the image must be a {words} array, got shape {array.shape}")
    # JSON's true and false would pass as 1 and 0: refuse them, as the API's schema does.
    if any(isinstance(value, bool) for value in np.asarray(values, dtype=object).ravel()):
        raise ImageError("pixel values must be numbers, not true or false")
    if not np.isfinite(array).all():
        raise ImageError("the image holds NaN or infinite values")
    if array.min() < 0 or array.max() > 255:
        raise ImageError(
            f"pixel values must be 0-255 or 0-1, got {array.min():g} to {array.max():g}"
        )
    if array.max() > 1:
        array = array / 255.0
    return array.astype(np.float32)


def media_type(content_type: str) -> str:
    """A Content-Type header's media type, in lower case as HTTP's are matched (RFC 9110):
    `Image/PNG; q=1` is `image/png`."""
    return content_type.split(";", 1)[0].strip().lower()


def images_from(
    content_type: str, body: bytes, shape=(SIZE, SIZE, 1), digits: bool = True
) -> np.ndarray:
    """The request's images as a float32 (N, H, W, C) batch in [0, 1] for a model of input
    `shape`: pictures of digits prepared as MNIST was (`digits`), others resized."""
    if not body:
        raise ImageError("the body is empty; send an image or JSON")
    kind = media_type(content_type)
    if kind == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise ImageError("the body is not valid JSON (or nests too deeply)") from None
        return images_from_json(payload, shape, digits)
    if not (kind.startswith("image/") or kind == "multipart/form-data"):
        raise ImageError(
            f"unsupported content type '{content_type}'; send image/png, image/jpeg, "
            "multipart/form-data or application/json"
        )
    if digits:
        return fit(prepare(decode(body)), shape)[np.newaxis]
    return fit(decode(body, colour=shape[2] == 3), shape)[np.newaxis]


def images_from_json(payload: object, shape=(SIZE, SIZE, 1), digits=True):
    words = "x".join(map(str, shape[:2] if shape[2] == 1 else shape))
    if not isinstance(payload, dict) or not ({"image", "images"} & set(payload)):
        raise ImageError(f'send {{"image": <{words} array>}} or {{"images": [<{words}>, ...]}}')
    unknown = sorted(set(payload) - {"image", "images", "prepare"})
    if unknown or {"image", "images"} <= set(payload):
        named = f"unknown field(s) {', '.join(map(repr, unknown))}: " if unknown else ""
        raise ImageError(f"{named}send 'image' or 'images' (not both), maybe 'prepare'")
    arrays = [payload["image"]] if "image" in payload else payload["images"]
    if not isinstance(arrays, list) or not arrays:
        raise ImageError(f"'images' must be a non-empty list of {words} arrays")
    if len(arrays) > MAX_BATCH:
        raise ImageError(f"a batch holds at most {MAX_BATCH} images, got {len(arrays)}")
    as_drawn = payload.get("prepare", False)
    if not isinstance(as_drawn, bool):
        raise ImageError(f"'prepare' must be true or false, got {as_drawn!r}")
    if as_drawn and not digits:
        raise ImageError("'prepare' is for digit models; this one takes arrays as they are")
    images = [from_array(array, shape) for array in arrays]
    if as_drawn:
        images = [fit(prepare(image[..., 0]), shape) for image in images]
    return np.stack(images)
