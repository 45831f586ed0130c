"""Serve the champion model over HTTP, with a page to draw a digit (or upload a picture) on.

    digitune serve [--model mnist-cnn] [--host 127.0.0.1] [--port 8000] [--model-uri URI]

- `POST /predict`: an uploaded PNG or JPEG (multipart field `file`, or the raw body with an
  `image/*` content type), or JSON `{"image": 28x28}` or `{"images": [28x28, ...]}` with values
  0-255 or 0-1; answers class indices and names. A digit model's pictures are prepared the way
  MNIST was built (`digitune.imaging`), any other model's resized to its input; JSON arrays
  are taken as prepared (`"prepare": true` prepares a digit model's too).
- `GET /health`, `GET /metadata` (input shape, class names), `POST /reload`, `/docs`, page `/`.

The server listens at once and loads the model in the background (`/health` answers 503
"loading" until it is ready); a background thread polls the alias and swaps in a new version
when it moves, once a probe prediction on it succeeds, so `make promote` or `make rollback`
take effect without a restart and requests in flight finish on the model they started with.

Every request does bounded work (`digitune.payloads`): bodies over `MAX_BODY_BYTES` are
refused as they stream in (chunked too), pictures over `imaging.MAX_PIXELS` before they are
decoded, batches over `MAX_BATCH` before they are converted; decoding and prediction run in a
worker thread, never on the event loop. Every error is a JSON body with a `detail`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import threading
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from digitune import config, evaluate, imaging, payloads, registry, tracking

DIGITS = evaluate.DIGITS  # the class names of versions registered before datasets


@dataclasses.dataclass(frozen=True)
class Served:
    """One loaded model version; replaced whole, never changed, so readers need no lock."""

    model: object
    name: str
    version: str
    alias: str | None
    tags: dict
    signature: dict | None
    # From the version's signature and tags (MNIST's for versions registered before datasets).
    input_shape: tuple[int, int, int] = (imaging.SIZE, imaging.SIZE, 1)
    class_names: tuple[str, ...] = DIGITS

    @property
    def digits(self) -> bool:  # a digit model: pictures are prepared as MNIST was
        return tuple(self.class_names) == DIGITS and self.input_shape[2] == 1


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
        # Set once the first load has been tried, whatever came of it.
        self.first_attempt = threading.Event()
        self._lock = threading.Lock()

    def reload(self) -> bool:
        """Load the version the URI points at if it is not the one served; True if swapped."""
        with self._lock:
            try:
                return self._reload()
            finally:
                self.first_attempt.set()

    def _reload(self) -> bool:
        try:
            client = tracking.configure()
            if self.alias is not None:
                version = client.get_model_version_by_alias(self.name, self.alias)
            else:
                version = client.get_model_version(self.name, self.model_uri.rsplit("/", 1)[1])
            if self.served is not None and self.served.version == str(version.version):
                self.last_error = None
                return False
            model = registry.load_without_leftovers(f"models:/{self.name}/{version.version}")
            shape = registry.input_shape(model)
            class_names = tuple(json.loads(version.tags.get("class_names", "null")) or DIGITS)
            # What every version must answer before it serves: one blank image.
            probe = np.asarray(model.predict(np.zeros((1, *shape), dtype=np.float32)))
            if probe.shape != (1, len(class_names)) or not np.isfinite(probe).all():
                raise ValueError(
                    f"its probe prediction gave shape {probe.shape}"
                    + ("" if np.isfinite(probe).all() else " with NaN or infinity")
                    + f", expected {len(class_names)} finite probabilities"
                )
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
            input_shape=shape,
            class_names=class_names,
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
        # The server listens at once; the model loads in the background. A missing model is
        # not a crash: /health and /predict answer 503 until one loads.
        threading.Thread(
            target=_load_and_poll, args=(holder, stop, poll_seconds), name="loader", daemon=True
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
        if length is not None and length.isdigit() and int(length) > payloads.MAX_BODY_BYTES:
            return _error(
                413, f"the body is {int(length):,} bytes; the limit is {payloads.MAX_BODY_BYTES:,}"
            )
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # Starlette's own errors (404, 405, ...) as JSON with a message, as every other error.
        return _error(error.status_code, str(error.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return importlib.resources.files("digitune").joinpath("page.html").read_text()

    @app.get(
        "/health", response_model=payloads.HealthAnswer, responses=payloads.error_responses(503)
    )
    def health():
        served = holder.served
        if served is None:
            return _error(503, _not_ready(holder))
        return {"status": "ready", "model": served.name, "version": served.version}

    @app.get(
        "/metadata", response_model=payloads.MetadataAnswer, responses=payloads.error_responses(503)
    )
    def metadata():
        served = holder.served
        if served is None:
            return _error(503, _not_ready(holder))
        return {
            **_identity(served),
            "model_uri": holder.model_uri,
            "signature": served.signature,
            "dataset": served.tags.get("dataset", "mnist"),
            "input_shape": list(served.input_shape),
            "class_names": list(served.class_names),
            "digit_preparation": served.digits,
            "test_accuracy": served.tags.get("test_accuracy"),
            "study": served.tags.get("study"),
            "trial": served.tags.get("trial"),
        }

    @app.post(
        "/reload", response_model=payloads.ReloadAnswer, responses=payloads.error_responses(503)
    )
    def reload():
        swapped = holder.reload()
        if holder.served is None:
            return _error(503, holder.last_error or "no model loaded")
        return {"reloaded": swapped, **_identity(holder.served), "error": holder.last_error}

    @app.post(
        "/predict",
        response_model=payloads.PredictionAnswer,
        responses=payloads.error_responses(413, 422, 503),
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": payloads.PREDICT_JSON_SCHEMA,
                        "example": {"image": [[0] * imaging.SIZE] * imaging.SIZE},
                    },
                },
                "required": True,
                "description": "JSON as below; or a PNG or JPEG picture, as the raw body "
                "(Content-Type image/png or image/jpeg) or as the multipart field `file`, "
                "prepared as MNIST was.",
            }
        },
    )
    async def predict(request: Request):
        content_type = request.headers.get("content-type", "")
        served = holder.served  # One reference for the whole request, whatever reloads.
        try:
            body = await payloads.read_body(request)
            if content_type.startswith("multipart/form-data"):
                body = await payloads.file_from_form(request, body)
            if served is None:
                return _error(503, _not_ready(holder))
            # Decoding and preparing take a thread of their own, not the event loop.
            images = await run_in_threadpool(
                payloads.images_from, content_type, body, served.input_shape, served.digits
            )
        except payloads.BodyTooLarge as error:
            return _error(413, str(error))
        except imaging.ImageError as error:
            return _error(422, str(error))
        started = time.perf_counter()
        probabilities = np.asarray(await run_in_threadpool(served.model.predict, images))
        return {
            **_identity(served),
            "milliseconds": round((time.perf_counter() - started) * 1000, 3),
            "predictions": [
                payloads.prediction(row, served.class_names, served.digits) for row in probabilities
            ],
        }

    return app


def _not_ready(holder: ModelHolder) -> str:
    if holder.last_error:
        return holder.last_error
    if not holder.first_attempt.is_set():
        return f"loading {holder.model_uri}"
    return "no model loaded yet"


def _load_and_poll(holder: ModelHolder, stop: threading.Event, seconds: float) -> None:
    _reload_whatever_happens(holder)
    if seconds > 0:
        _poll(holder, stop, seconds)


def _reload_whatever_happens(holder: ModelHolder) -> None:
    """A reload that never raises: the poller must outlive anything a reload meets."""
    try:
        holder.reload()
    except Exception as error:  # noqa: BLE001
        holder.last_error = config.redact(f"reloading {holder.model_uri} failed: {error}")


def _poll(holder: ModelHolder, stop: threading.Event, seconds: float) -> None:
    while not stop.wait(seconds):
        _reload_whatever_happens(holder)


def _identity(served: Served) -> dict:
    return {"model": served.name, "version": served.version, "alias": served.alias}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": config.redact(message)})


def run(host: str, port: int, model_uri: str | None, poll_seconds: float) -> None:
    import uvicorn

    uvicorn.run(create_app(model_uri, poll_seconds), host=host, port=port, log_level="info")
