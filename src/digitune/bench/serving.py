"""How fast a running service answers: `digitune bench-serve --url http://127.0.0.1:8000`
(with `make serve` running). p50 and p99 latency of single-image requests, as JSON and as a
PNG upload, and images per second of batched JSON requests.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
import urllib.parse
import uuid

import numpy as np
import pandas as pd
from PIL import Image

from digitune.data import mnist


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=30)
    connection.connect()
    # Small requests must not wait on Nagle's algorithm for the previous one's ACK.
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _post(connection, body: bytes, content_type: str) -> float:
    started = time.perf_counter()
    connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    response = connection.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"/predict answered {response.status}: {payload[:200]!r}")
    return elapsed


def _png_form(image: np.ndarray) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    Image.fromarray(255 - image).save(buffer, format="PNG")  # dark ink on white paper
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + buffer.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def serve_latency(url: str, requests: int = 500, batch: int = 64) -> pd.DataFrame:
    """p50 and p99 latency of single-image requests (JSON and PNG upload) and the images per
    second of batched JSON requests, against a running service."""
    images = mnist.load().test_images[: max(batch, 100)]
    connection = _connect(url)
    single_json = [json.dumps({"image": image.tolist()}).encode() for image in images]
    single_png = [_png_form(image) for image in images]
    batched = json.dumps({"images": images[:batch].tolist()}).encode()
    for body in single_json[:20]:  # Warm up: first calls trace and allocate.
        _post(connection, body, "application/json")

    rows = []
    for name, bodies in (
        ("1 image, JSON 28x28", [(body, "application/json") for body in single_json]),
        ("1 image, PNG upload (prepared)", single_png),
    ):
        seconds = np.array([_post(connection, *bodies[i % len(bodies)]) for i in range(requests)])
        rows.append(_row(name, seconds, 1))
    rounds = max(10, requests // 10)
    seconds = np.array([_post(connection, batched, "application/json") for _ in range(rounds)])
    rows.append(_row(f"{batch} images, JSON batch", seconds, batch))
    connection.close()
    return pd.DataFrame(rows)


def _row(name: str, seconds: np.ndarray, images_per_request: int) -> dict:
    return {
        "request": name,
        "requests": len(seconds),
        "p50_ms": round(float(np.percentile(seconds, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(seconds, 99)) * 1000, 2),
        "images_per_second": round(images_per_request / float(np.median(seconds)), 1),
    }
