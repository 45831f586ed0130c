"""The service's API as data: the answers of `digitune serve` and their errors (for the
OpenAPI schema at `/docs` and for clients), the JSON forms `POST /predict` takes, and one
image's answer from its probabilities."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from digitune import preprocessing


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
        401: "DIGITUNE_RELOAD_TOKEN is set and the request does not carry it",
        408: "the body did not arrive in time",
        413: "the body is over the size limit",
        422: "the request is not an image or batch the model can take",
        429: "a reload ran moments ago, or runs now; see Retry-After",
        503: "no model is loaded yet (loading, or the registry cannot be reached), or every "
        "slot that prepares pictures is busy (see Retry-After)",
    }
    return {status: {"model": ErrorAnswer, "description": words[status]} for status in statuses}


# The JSON forms of /predict: one 28x28 image, or a batch, of 0-255 or 0-1 values.
_ROW = {
    "type": "array",
    "items": {"type": "number", "minimum": 0, "maximum": 255},
    "minItems": preprocessing.SIZE,
    "maxItems": preprocessing.SIZE,
}
_IMAGE = {
    "type": "array",
    "items": _ROW,
    "minItems": preprocessing.SIZE,
    "maxItems": preprocessing.SIZE,
}
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
                "images": {
                    "type": "array",
                    "items": _IMAGE,
                    "minItems": 1,
                    "maxItems": preprocessing.MAX_BATCH,
                },
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
