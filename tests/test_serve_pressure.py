"""The service under pressure, on a real uvicorn server with the champion loaded: many
pictures at once, clients that trickle their headers or their body, and /reload."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from conftest import free_port
from digitune import preprocessing, serve

pytestmark = pytest.mark.slow

BLANK = {"image": [[0] * 28] * 28}


@contextlib.contextmanager
def running(app):
    """`app` on uvicorn in a thread of this process, with digitune's own connection class,
    once its model is loaded; yields its port."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=serve.Connection, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (server.started and app.state.holder.served is not None):
            assert time.monotonic() < deadline, app.state.holder.last_error or "never started"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def request(port: int, method: str, path: str, body=None, headers=None, timeout=60.0):
    """(status, headers, body) of one request on a connection of its own."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=payload, headers=sent)
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()


def test_pictures_beyond_the_slots_get_503_at_once_and_health_never_waits(serving, monkeypatch):
    """60 requests at once, each decode held until released: exactly `prepare_slots` are
    prepared at a time, the rest are told to retry (503 and Retry-After) without waiting,
    and /health answers at once throughout, though more requests are pending than
    Starlette's 40 shared threads."""
    prepare = preprocessing.images_from
    release, lock = threading.Event(), threading.Lock()
    inside = {"now": 0, "most": 0}

    def held(*args):
        with lock:
            inside["now"] += 1
            inside["most"] = max(inside["most"], inside["now"])
        release.wait(60)
        with lock:
            inside["now"] -= 1
        return prepare(*args)

    monkeypatch.setattr(preprocessing, "images_from", held)
    with (
        running(serve.create_app(poll_seconds=0, prepare_slots=3)) as port,
        concurrent.futures.ThreadPoolExecutor(60) as pool,
    ):
        answers = [pool.submit(request, port, "POST", "/predict", BLANK) for _ in range(60)]
        deadline = time.monotonic() + 30
        while sum(answer.done() for answer in answers) < 57:
            assert time.monotonic() < deadline, "the requests beyond the slots were kept waiting"
            time.sleep(0.05)
        health = []
        for _ in range(20):
            started = time.perf_counter()
            status, _, _ = request(port, "GET", "/health", timeout=5)
            health.append(time.perf_counter() - started)
            assert status == 200
        release.set()
        results = [answer.result() for answer in answers]
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 3 + [503] * 57
    refused = [(headers, body) for status, headers, body in results if status == 503]
    assert all(headers["Retry-After"] == "1" for headers, _ in refused)
    assert b"all 3 slots that prepare pictures are busy" in refused[0][1]
    assert inside["most"] == 3
    assert max(health) < 1.0, health


def test_clients_that_trickle_their_headers_or_body_are_cut_off(serving, monkeypatch):
    """200 connections that send half a request line and then nothing: the server answers
    /health meanwhile, and closes each of them after HEADER_SECONDS. A body that stops
    arriving is answered 408 after BODY_SECONDS."""
    monkeypatch.setattr(serve, "HEADER_SECONDS", 2)
    monkeypatch.setattr(serve, "BODY_SECONDS", 2)
    with running(serve.create_app(poll_seconds=0)) as port:
        slow = []
        for _ in range(200):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"POST /predict HTTP/1.1\r\nHost: digitune\r\nContent-Ty")
            slow.append(connection)
        started = time.perf_counter()
        status, _, _ = request(port, "GET", "/health", timeout=5)
        assert status == 200 and time.perf_counter() - started < 1.0
        for connection in slow:
            connection.settimeout(10)
            assert connection.recv(1024) == b"", "a slow client's connection was kept open"
            connection.close()

        trickling = socket.create_connection(("127.0.0.1", port))
        trickling.sendall(
            b"POST /predict HTTP/1.1\r\nHost: digitune\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b'{"image": [[0, 0'
        )
        trickling.settimeout(10)
        answer = b""
        while chunk := trickling.recv(65536):  # The server closes the connection after it.
            answer += chunk
        trickling.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"the body took over 2 s to arrive" in answer
        # The server goes on as before.
        assert request(port, "POST", "/predict", BLANK)[0] == 200


def test_reload_asks_for_the_token_and_is_rate_limited(serving):
    with running(serve.create_app(poll_seconds=0, reload_token="s3cret")) as port:
        status, _, body = request(port, "POST", "/reload")
        assert status == 401 and b"Authorization: Bearer" in body
        status, _, _ = request(port, "POST", "/reload", headers={"Authorization": "Bearer no"})
        assert status == 401
        authorised = {"Authorization": "Bearer s3cret"}
        status, _, body = request(port, "POST", "/reload", headers=authorised)
        assert status == 200 and json.loads(body)["reloaded"] is False
        status, headers, body = request(port, "POST", "/reload", headers=authorised)
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= serve.RELOAD_INTERVAL_SECONDS
        assert request(port, "GET", "/health")[0] == 200
