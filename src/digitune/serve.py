"""Serve the champion model over HTTP, with a page to draw a digit on.

    digitune serve [--host 127.0.0.1] [--port 8000] [--model-uri models:/mnist-cnn@champion]

- `POST /predict`: an uploaded PNG or JPEG (multipart field `file`, or the raw body with an
  `image/*` content type), or JSON `{"image": 28x28}` or `{"images": [28x28, ...]}` with values
  0-255 or 0-1. Uploaded pictures are prepared the way MNIST was built (`digitune.imaging`);
  JSON arrays are taken as MNIST-like already (add `"prepare": true` to prepare them too).
- `GET /health`, `GET /metadata`, `POST /reload`, OpenAPI docs at `/docs`, the page at `/`.

The model loads once at start-up; a background thread polls the alias and swaps in a new
version when it moves, so `make promote` or `make rollback` take effect without a restart and
requests in flight finish on the model they started with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import threading
import time

import mlflow
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from digitune import config, imaging, tracking

MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Served:
    """One loaded model version; replaced whole, never changed, so readers need no lock."""

    model: object
    name: str
    version: str
    alias: str | None
    tags: dict
    signature: dict | None


class ModelHolder:
    """Loads the model a URI names (`models:/<name>@<alias>` or `models:/<name>/<version>`)
    and reloads it when the alias moves to another version."""

    def __init__(self, model_uri: str):
        self.model_uri = model_uri
        name_and_ref = model_uri.removeprefix("models:/")
        if "@" in name_and_ref:
            self.name, self.alias = name_and_ref.split("@", 1)
        else:
            self.name, self.alias = name_and_ref.split("/", 1)[0], None
        self.served: Served | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def reload(self) -> bool:
        """Load the version the URI points at if it is not the one served; True if swapped."""
        with self._lock:
            try:
                client = tracking.configure()
                if self.alias is not None:
                    version = client.get_model_version_by_alias(self.name, self.alias)
                else:
                    version = client.get_model_version(self.name, self.model_uri.rsplit("/", 1)[1])
                if self.served is not None and self.served.version == str(version.version):
                    return False
                model = mlflow.pyfunc.load_model(f"models:/{self.name}/{version.version}")
            except Exception as error:  # noqa: BLE001 -- keep serving what we have.
                self.last_error = config.redact(f"cannot load {self.model_uri}: {error}")
                return False
            signature = model.metadata.signature
            self.served = Served(
                model=model,
                name=self.name,
                version=str(version.version),
                alias=self.alias,
                tags=dict(version.tags),
                # MLflow keeps each part of a signature as a JSON string; serve it as JSON.
                signature={
                    part: json.loads(value) if isinstance(value, str) else value
                    for part, value in signature.to_dict().items()
                }
                if signature
                else None,
            )
            self.last_error = None
            return True


def create_app(model_uri: str | None = None, poll_seconds: float = 10.0) -> FastAPI:
    """The FastAPI app; it starts loading the model and polling the alias on start-up."""
    holder = ModelHolder(
        model_uri or f"models:/{config.REGISTERED_MODEL_NAME}@{config.CHAMPION_ALIAS}"
    )
    stop = threading.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # A missing model is not a crash: /health and /predict answer 503 until one loads.
        holder.reload()
        if poll_seconds > 0:
            threading.Thread(
                target=_poll, args=(holder, stop, poll_seconds), name="alias-poller", daemon=True
            ).start()
        yield
        stop.set()

    app = FastAPI(
        title="digitune",
        description="Handwritten digit recognition with the champion MNIST CNN.",
        version="1",
        lifespan=lifespan,
    )
    app.state.holder = holder

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(
                413, f"the body is {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}"
            )
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return importlib.resources.files("digitune").joinpath("page.html").read_text()

    @app.get("/health")
    def health():
        served = holder.served
        if served is None:
            return _error(503, holder.last_error or "no model loaded yet")
        return {"status": "ready", "model": served.name, "version": served.version}

    @app.get("/metadata")
    def metadata():
        served = holder.served
        if served is None:
            return _error(503, holder.last_error or "no model loaded yet")
        return {
            **_identity(served),
            "model_uri": holder.model_uri,
            "signature": served.signature,
            "test_accuracy": served.tags.get("test_accuracy"),
            "study": served.tags.get("study"),
            "trial": served.tags.get("trial"),
        }

    @app.post("/reload")
    def reload():
        swapped = holder.reload()
        if holder.served is None:
            return _error(503, holder.last_error or "no model loaded")
        return {"reloaded": swapped, **_identity(holder.served), "error": holder.last_error}

    @app.post(
        "/predict",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {"example": {"image": [[0] * 28] * 28}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                },
                "required": True,
            }
        },
    )
    async def predict(request: Request):
        try:
            images = await _images_from(request)
        except imaging.ImageError as error:
            return _error(422, str(error))
        served = holder.served  # One reference for the whole request, whatever reloads.
        if served is None:
            return _error(503, holder.last_error or "no model loaded yet")
        started = time.perf_counter()
        probabilities = np.asarray(served.model.predict(images[..., np.newaxis]))
        return {
            **_identity(served),
            "milliseconds": round((time.perf_counter() - started) * 1000, 3),
            "predictions": [
                {"digit": int(row.argmax()), "probabilities": [round(float(p), 6) for p in row]}
                for row in probabilities
            ],
        }

    return app


async def _images_from(request: Request) -> np.ndarray:
    """The request's images as a float32 (N, 28, 28) batch in [0, 1]."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:  # A body sent without a length header.
        raise imaging.ImageError(f"the body is over the limit of {MAX_BODY_BYTES:,} bytes")
    if not body:
        raise imaging.ImageError("the body is empty; send an image or JSON")
    if content_type.startswith("application/json"):
        try:
            payload = await request.json()
        except ValueError:
            raise imaging.ImageError("the body is not valid JSON") from None
        return _images_from_json(payload)
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise imaging.ImageError("the form has no file field named 'file'")
        body = await upload.read()
    elif not content_type.startswith("image/"):
        raise imaging.ImageError(
            f"unsupported content type '{content_type}'; send image/png, image/jpeg, "
            "multipart/form-data or application/json"
        )
    return imaging.prepare(imaging.decode(body))[np.newaxis]


def _images_from_json(payload: object) -> np.ndarray:
    if not isinstance(payload, dict) or not ({"image", "images"} & set(payload)):
        raise imaging.ImageError('send {"image": <28x28 array>} or {"images": [<28x28>, ...]}')
    arrays = [payload["image"]] if "image" in payload else payload["images"]
    if not isinstance(arrays, list) or not arrays:
        raise imaging.ImageError("'images' must be a non-empty list of 28x28 arrays")
    if len(arrays) > MAX_BATCH:
        raise imaging.ImageError(f"a batch holds at most {MAX_BATCH} images, got {len(arrays)}")
    images = [imaging.from_array(array) for array in arrays]
    if payload.get("prepare") is True:
        images = [imaging.prepare(image) for image in images]
    return np.stack(images)


def _poll(holder: ModelHolder, stop: threading.Event, seconds: float) -> None:
    while not stop.wait(seconds):
        holder.reload()


def _identity(served: Served) -> dict:
    return {"model": served.name, "version": served.version, "alias": served.alias}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": config.redact(message)})


def run(host: str, port: int, model_uri: str | None, poll_seconds: float) -> None:
    import uvicorn

    uvicorn.run(create_app(model_uri, poll_seconds), host=host, port=port, log_level="info")
