"""What the prediction API reads and answers: request bodies read with a size limit, turned
into a batch of the served model's images (28x28 for MNIST's), and the JSON Schema and
response models of the OpenAPI document.

Every function here does bounded work: bodies over `MAX_BODY_BYTES` are refused as they stream
in, batches over `MAX_BATCH` before they are converted, pictures by `digitune.imaging`.
"""

from __future__ import annotations

import json

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from digitune import imaging

# A phone's photo of a digit is a few megabytes.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 256


class BodyTooLarge(Exception):
    """The request body is over MAX_BODY_BYTES."""


# The API's answers, for the OpenAPI schema (the `/docs` page) and for clients.
class _Answer(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class Prediction(_Answer):
    class_index: int = Field(ge=0)
    class_name: str
    # The class index again for a digit model (class names 0-9), else null.
    digit: int | None = Field(default=None, ge=0, le=9)
    probabilities: list[float] = Field(min_length=2)


class PredictionAnswer(_Answer):
    model: str
    version: str
    alias: str | None
    milliseconds: float
    predictions: list[Prediction]


class HealthAnswer(_Answer):
    status: str
    model: str
    version: str


class MetadataAnswer(_Answer):
    model: str
    version: str
    alias: str | None
    model_uri: str
    signature: dict | None
    dataset: str | None
    input_shape: list[int]
    class_names: list[str]
    # Whether uploaded pictures are prepared as MNIST was (digit models), else resized.
    digit_preparation: bool
    test_accuracy: str | None
    study: str | None
    trial: str | None


class ReloadAnswer(_Answer):
    reloaded: bool
    model: str
    version: str
    alias: str | None
    error: str | None


class ErrorAnswer(_Answer):
    detail: str = Field(description="what is wrong, in words")


def error_responses(*statuses: int) -> dict:
    words = {
        413: "the body is over the size limit",
        422: "the request is not an image or batch the model can take",
        503: "no model is loaded yet (loading, or the registry cannot be reached)",
    }
    return {status: {"model": ErrorAnswer, "description": words[status]} for status in statuses}


# The JSON forms of /predict: one 28x28 image, or a batch, of 0-255 or 0-1 values.
_ROW = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 255},
        "minItems": imaging.SIZE, "maxItems": imaging.SIZE}  # fmt: skip
_IMAGE = {"type": "array", "items": _ROW, "minItems": imaging.SIZE, "maxItems": imaging.SIZE}
PREDICT_JSON_SCHEMA = {
    "oneOf": [
        {
            "type": "object",
            "properties": {"image": _IMAGE, "prepare": {"type": "boolean"}},
            "required": ["image"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "images": {"type": "array", "items": _IMAGE, "minItems": 1, "maxItems": MAX_BATCH},
                "prepare": {"type": "boolean"},
            },
            "required": ["images"],
            "additionalProperties": False,
        },
    ]
}


def prediction(probabilities: np.ndarray, class_names, digits: bool) -> dict:
    """One image's answer: the likeliest class by index and name, and every probability."""
    best = int(probabilities.argmax())
    return {
        "class_index": best,
        "class_name": class_names[best],
        "digit": best if digits else None,
        "probabilities": [round(float(p), 6) for p in probabilities],
    }


async def read_body(request: Request) -> bytes:
    """The body, refused as soon as it is over MAX_BODY_BYTES, whether or not it said its
    length (a chunked body does not)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge(f"the body is over the limit of {MAX_BODY_BYTES:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def file_from_form(request: Request, body: bytes) -> bytes:
    """The bytes of the multipart field `file`, parsed from the body already read."""

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except (HTTPException, MultiPartException) as error:
        detail = error.detail if isinstance(error, HTTPException) else error.message
        raise imaging.ImageError(f"not a readable multipart form ({detail})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise imaging.ImageError("the form has no file field named 'file'")
    return await upload.read()


def images_from(
    content_type: str, body: bytes, shape=(imaging.SIZE, imaging.SIZE, 1), digits: bool = True
) -> np.ndarray:
    """The request's images as a float32 (N, H, W, C) batch in [0, 1] for a model of input
    `shape`: pictures of digits prepared as MNIST was (`digits`), others resized."""
    if not body:
        raise imaging.ImageError("the body is empty; send an image or JSON")
    if content_type.startswith("application/json"):
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            raise imaging.ImageError("the body is not valid JSON (or nests too deeply)") from None
        return images_from_json(payload, shape, digits)
    if not content_type.startswith(("image/", "multipart/form-data")):
        raise imaging.ImageError(
            f"unsupported content type '{content_type}'; send image/png, image/jpeg, "
            "multipart/form-data or application/json"
        )
    if digits:
        return imaging.fit(imaging.prepare(imaging.decode(body)), shape)[np.newaxis]
    return imaging.fit(imaging.decode(body, colour=shape[2] == 3), shape)[np.newaxis]


def images_from_json(payload: object, shape=(imaging.SIZE, imaging.SIZE, 1), digits=True):
    words = "x".join(map(str, shape[:2] if shape[2] == 1 else shape))
    if not isinstance(payload, dict) or not ({"image", "images"} & set(payload)):
        raise imaging.ImageError(
            f'send {{"image": <{words} array>}} or {{"images": [<{words}>, ...]}}'
        )
    unknown = sorted(set(payload) - {"image", "images", "prepare"})
    if unknown or {"image", "images"} <= set(payload):
        named = f"unknown field(s) {', '.join(map(repr, unknown))}: " if unknown else ""
        raise imaging.ImageError(f"{named}send 'image' or 'images' (not both), maybe 'prepare'")
    arrays = [payload["image"]] if "image" in payload else payload["images"]
    if not isinstance(arrays, list) or not arrays:
        raise imaging.ImageError(f"'images' must be a non-empty list of {words} arrays")
    if len(arrays) > MAX_BATCH:
        raise imaging.ImageError(f"a batch holds at most {MAX_BATCH} images, got {len(arrays)}")
    prepare = payload.get("prepare", False)
    if not isinstance(prepare, bool):
        raise imaging.ImageError(f"'prepare' must be true or false, got {prepare!r}")
    if prepare and not digits:
        raise imaging.ImageError("'prepare' is for digit models; this one takes arrays as they are")
    images = [imaging.from_array(array, shape) for array in arrays]
    if prepare:
        images = [imaging.fit(imaging.prepare(image[..., 0]), shape) for image in images]
    return np.stack(images)
