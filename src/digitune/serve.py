"""Serve the champion model over HTTP, with a page to draw a digit (or upload a picture) on.

    digitune serve [--model mnist-cnn] [--host 127.0.0.1] [--port 8000] [--model-uri URI]

- `POST /predict`: an uploaded PNG or JPEG (multipart field `file`, or the raw body with an
  `image/*` content type), or JSON `{"image": 28x28}` or `{"images": [28x28, ...]}` with values
  0-255 or 0-1; answers class indices and names. A digit model's pictures are prepared the way
  MNIST was built (`digitune.preprocessing`), any other model's resized to its input; JSON arrays
  are taken as prepared (`"prepare": true` prepares a digit model's too).
- `GET /health`, `GET /metadata` (input shape, class names), `POST /reload`, `/docs`, page `/`.

The server listens at once and loads the model in the background (`/health` answers 503
"loading" until it is ready); a background thread polls the alias and swaps in a new version
when it moves, once a probe prediction on it succeeds, so `make promote` or `make rollback`
take effect without a restart and requests in flight finish on the model they started with.

Every request does bounded work: bodies over `MAX_BODY_BYTES` are refused as they stream in
(chunked too), pictures over `preprocessing.MAX_PIXELS` before they are decoded, batches over
`preprocessing.MAX_BATCH` before they are converted; decoding and prediction run in worker
threads, never on the event loop. Under pressure the service stays answerable:
- at most `PREPARE_SLOTS` requests decode or predict at once (a large picture takes a core
  and hundreds of MB while it is prepared); beyond that `/predict` answers 503 with
  `Retry-After` at once, rather than queueing memory;
- `/health` and `/metadata` answer on the event loop, never waiting for a thread;
- `/reload` runs one at a time, at most once every `RELOAD_INTERVAL_SECONDS`, in a thread of
  its own, and asks for `Authorization: Bearer <DIGITUNE_RELOAD_TOKEN>` where that is set;
- a client must send its headers within `HEADER_SECONDS` and its body within
  `BODY_SECONDS`, so slow clients cannot hold connections or memory.
Every error is a JSON body with a `detail`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import importlib.resources
import json
import os
import threading
import time

import anyio
import anyio.to_thread
import h11
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from uvicorn.protocols.http.h11_impl import H11Protocol

from digitune import api, config, data, loader, preprocessing, tracking

# A phone's photo of a digit is a few megabytes.
MAX_BODY_BYTES = 8 * 1024 * 1024
# Requests decoding or predicting at once: one a core (two at least). A 4096x4096 RGBA PNG
# takes about 0.3 GB while it is prepared, so this bounds the memory pictures can take.
PREPARE_SLOTS = max(2, os.cpu_count() or 2)
RETRY_AFTER_SECONDS = 1
# A client trickling its headers or its body is cut off after these.
HEADER_SECONDS = 10
BODY_SECONDS = 30
RELOAD_INTERVAL_SECONDS = 5


class BodyTooLarge(Exception):
    """The request body is over MAX_BODY_BYTES."""


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
        raise preprocessing.ImageError(f"not a readable multipart form ({detail})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise preprocessing.ImageError("the form has no file field named 'file'")
    return await upload.read()


DIGITS = data.DIGITS  # the class names of versions registered before datasets


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
    input_shape: tuple[int, int, int] = (preprocessing.SIZE, preprocessing.SIZE, 1)
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
            model = loader.load(version)
            shape = loader.input_shape(model)
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


def create_app(
    model_uri: str | None = None,
    poll_seconds: float = 10.0,
    prepare_slots: int = PREPARE_SLOTS,
    reload_token: str | None = None,
) -> FastAPI:
    """The FastAPI app; it starts loading the model and polling the alias on start-up.
    `reload_token` (default: DIGITUNE_RELOAD_TOKEN) is what `POST /reload` asks for."""
    holder = ModelHolder(
        model_uri or f"models:/{config.REGISTERED_MODEL_NAME}@{config.CHAMPION_ALIAS}"
    )
    stop = threading.Event()
    reload_token = reload_token or config.reload_token()
    # Threads of their own, apart from the pool that Starlette's other work shares; `busy` is
    # only read and changed on the event loop, so checking it and taking a slot is one step.
    preparing = anyio.CapacityLimiter(prepare_slots)
    reloading = anyio.CapacityLimiter(1)
    pressure = {"busy": 0, "last_reload": -float("inf")}

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
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return _error(
                413, f"the body is {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}"
            )
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # Starlette's own errors (404, 405, ...) as JSON with a message, as every other error.
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception):
        # Whatever nobody foresaw is still JSON, and says nothing of the server's insides
        # (uvicorn logs the traceback).
        return _error(500, f"the server failed on this request ({type(error).__name__})")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return importlib.resources.files("digitune").joinpath("page.html").read_text()

    # /health and /metadata only read what is loaded: they answer on the event loop, and no
    # amount of work in the threads delays them.
    @app.get("/health", response_model=api.HealthAnswer, responses=api.error_responses(503))
    async def health():
        served = holder.served
        if served is None:
            return _error(503, _not_ready(holder))
        return {"status": "ready", "model": served.name, "version": served.version}

    @app.get("/metadata", response_model=api.MetadataAnswer, responses=api.error_responses(503))
    async def metadata():
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
        "/reload", response_model=api.ReloadAnswer, responses=api.error_responses(401, 429, 503)
    )
    async def reload(request: Request):
        if reload_token is not None and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {reload_token}".encode()
        ):
            return _error(401, "POST /reload needs the header Authorization: Bearer <token>")
        wait = pressure["last_reload"] + RELOAD_INTERVAL_SECONDS - time.monotonic()
        if reloading.borrowed_tokens or wait > 0:
            return _error(
                429,
                f"a reload runs now or ran in the last {RELOAD_INTERVAL_SECONDS} s; the alias is "
                "also checked on its own every --poll-seconds",
                retry_after=max(1, round(wait)),
            )
        pressure["last_reload"] = time.monotonic()
        swapped = await anyio.to_thread.run_sync(holder.reload, limiter=reloading)
        if holder.served is None:
            return _error(503, holder.last_error or "no model loaded")
        return {"reloaded": swapped, **_identity(holder.served), "error": holder.last_error}

    @app.post(
        "/predict",
        response_model=api.PredictionAnswer,
        responses=api.error_responses(413, 422, 503),
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": api.PREDICT_JSON_SCHEMA,
                        "example": {"image": [[0] * preprocessing.SIZE] * preprocessing.SIZE},
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
            with anyio.fail_after(BODY_SECONDS):
                body = await read_body(request)
                if preprocessing.media_type(content_type) == "multipart/form-data":
                    body = await file_from_form(request, body)
        except BodyTooLarge as error:
            return _error(413, str(error))
        except preprocessing.ImageError as error:
            return _error(422, str(error))
        except TimeoutError:
            return _error(408, f"the body took over {BODY_SECONDS} s to arrive")
        if served is None:
            return _error(503, _not_ready(holder))
        if pressure["busy"] >= prepare_slots:
            return _error(
                503,
                f"all {prepare_slots} slots that prepare pictures are busy; try again shortly",
                retry_after=RETRY_AFTER_SECONDS,
            )
        pressure["busy"] += 1
        try:
            # Decoding and preparing take a thread of their own, not the event loop.
            images = await anyio.to_thread.run_sync(
                preprocessing.images_from,
                content_type,
                body,
                served.input_shape,
                served.digits,
                limiter=preparing,
            )
            del body  # The pictures' bytes are not held while the model predicts.
            started = time.perf_counter()
            probabilities = await anyio.to_thread.run_sync(
                served.model.predict, images, limiter=preparing
            )
        except preprocessing.ImageError as error:
            return _error(422, str(error))
        finally:
            pressure["busy"] -= 1
        unusable = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
        if unusable.size:
            return _error(
                422,
                f"the model gave NaN or infinite probabilities for image(s) "
                f"{', '.join(map(str, unusable[:10]))} of the request: no answer for them",
            )
        return {
            **_identity(served),
            "milliseconds": round((time.perf_counter() - started) * 1000, 3),
            "predictions": [
                api.prediction(row, served.class_names, served.digits) for row in probabilities
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


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        status_code=status, content={"detail": config.redact(message)}, headers=headers
    )


class Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's headers take over
    HEADER_SECONDS to arrive. uvicorn closes idle keep-alive connections, but not one that
    sends its headers a byte at a time, and enough of those hold the server's connections."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._headers_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._headers_timer.cancel()  # The next request on this connection gets its own.
        self._headers_timer = self.loop.call_later(HEADER_SECONDS, self._headers_too_slow)

    def connection_lost(self, exc) -> None:
        self._headers_timer.cancel()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        # IDLE: the client has not finished a request's headers (after a response, the
        # cycle starts again at IDLE).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def run(host: str, port: int, model_uri: str | None, poll_seconds: float) -> None:
    import uvicorn

    uvicorn.run(
        create_app(model_uri, poll_seconds),
        host=host,
        port=port,
        log_level="info",
        http=Connection,
    )
