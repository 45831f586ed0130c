"""How fast a running service answers: `digitune bench-serve --url http://127.0.0.1:8000`
(with `make serve` running). p50 and p99 latency of single-image requests, as JSON and as a
PNG upload, and images per second of batched JSON requests.

`digitune bench-serve --pressure [--pid PID]`: how it holds up instead. /health latency, the
answers, and (with the server's process id) its peak resident memory under 32 concurrent
4096x4096 RGBA uploads, then under 200 connections that trickle their headers.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import socket
import threading
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


def large_picture(side: int = 4096) -> bytes:
    """A `side`x`side` RGBA PNG of a dark stroke on white: a few hundred KB on the wire, as a
    drawing is, and side² x 4 bytes and more once decoded."""
    picture = np.full((side, side, 4), 255, np.uint8)
    picture[side // 4 : 3 * side // 4, side // 2 - side // 20 : side // 2 + side // 20, :3] = 0
    buffer = io.BytesIO()
    Image.fromarray(picture, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


class _Sampler(threading.Thread):
    """Times GET /health every 50 ms and reads the server's resident memory (with `pid`)
    until stopped."""

    def __init__(self, url: str, pid: int | None):
        super().__init__(daemon=True)
        self.url, self.pid = url, pid
        self.health: list[float] = []
        self.failed = 0
        self.peak_rss = 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                connection = _connect(self.url)
                connection.request("GET", "/health")
                status = connection.getresponse().status
                connection.close()
                self.failed += status != 200
            except OSError:
                self.failed += 1
            self.health.append(time.perf_counter() - started)
            self.peak_rss = max(self.peak_rss, _rss(self.pid))
            self.stop.wait(0.05)


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return 0
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _pressure_row(name: str, sampler: _Sampler, answers: str, seconds: float) -> dict:
    health = np.array(sampler.health) * 1000
    return {
        "load": name,
        "seconds": round(seconds, 1),
        "answers": answers,
        "health_p50_ms": round(float(np.percentile(health, 50)), 1),
        "health_p99_ms": round(float(np.percentile(health, 99)), 1),
        "health_max_ms": round(float(health.max()), 1),
        "health_failed": sampler.failed,
        "peak_rss_mb": round(sampler.peak_rss / 2**20) if sampler.pid else None,
    }


def pressure(
    url: str, pid: int | None = None, uploads: int = 32, slow: int = 200, slow_seconds: float = 20
) -> pd.DataFrame:
    """/health latency and the server's peak resident memory (given its `pid`) under
    `uploads` concurrent 4096x4096 RGBA PNG uploads, then under `slow` connections that send
    half a request line and then one byte a second for `slow_seconds`."""
    import concurrent.futures

    picture = large_picture()
    rows = []
    sampler = _Sampler(url, pid)
    sampler.start()

    def upload(_):
        connection = http.client.HTTPConnection(
            urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port, timeout=600
        )
        try:
            connection.request(
                "POST", "/predict", body=picture, headers={"Content-Type": "image/png"}
            )
            response = connection.getresponse()
            response.read()
            return response.status
        except OSError as error:
            return type(error).__name__
        finally:
            connection.close()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
        statuses = pd.Series(list(pool.map(upload, range(uploads)))).value_counts().sort_index()
    sampler.stop.set()
    sampler.join()
    rows.append(
        _pressure_row(
            f"{uploads} concurrent 4096x4096 RGBA PNGs ({len(picture) // 1000} KB each)",
            sampler,
            ", ".join(f"{count} x {status}" for status, count in statuses.items()),
            time.perf_counter() - started,
        )
    )

    sampler = _Sampler(url, pid)
    sampler.start()
    parts = urllib.parse.urlsplit(url)
    connections, closed = [], 0
    for _ in range(slow):
        connection = socket.create_connection((parts.hostname, parts.port))
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: digitune\r\n")
        connection.setblocking(False)
        connections.append(connection)
    started = time.perf_counter()
    while time.perf_counter() - started < slow_seconds:
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.send(b"X")
        time.sleep(1)
    for connection in connections:
        try:
            closed += connection.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        connection.close()
    sampler.stop.set()
    sampler.join()
    rows.append(
        _pressure_row(
            f"{slow} connections trickling their headers for {slow_seconds:g} s",
            sampler,
            f"{closed} of {slow} closed by the server",
            time.perf_counter() - started,
        )
    )
    return pd.DataFrame(rows)
