"""Benchmarks: measured side by side in one run, reported as medians and percentiles.

    digitune bench                                     training throughput, digitune vs plain fit
    digitune bench-serve --url http://127.0.0.1:8000   (with `make serve` running)

Benchmarks are not tests: the machines are shared and noisy, so they report numbers for a
person to read, and assert nothing.
"""

from __future__ import annotations

import datetime
import http.client
import importlib.util
import io
import json
import os
import platform
import socket
import time
import urllib.parse
import uuid
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from digitune import config, data, model, objective, tracking

BATCH_SIZES = (32, 128)


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
    images = data.load().test_images[: max(batch, 100)]
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


class EpochTimes(keras.callbacks.Callback):
    """Records each epoch's wall time."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._started)


def _baseline():
    """bench/tutorial_baseline.py, the tutorial's plain `model.fit`, as a module."""
    path = config.project_dir() / "bench" / "tutorial_baseline.py"
    spec = importlib.util.spec_from_file_location("tutorial_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_throughput(repeats: int = 3) -> pd.DataFrame:
    """Images per second of one epoch on the 50,000 tuning images, the tutorial's CNN, at
    batch 32 and 128: digitune's trainer (the trials' `objective.fit` under the study's
    precision) against the tutorial's plain float32 `model.fit`, both validating on the
    10,000 validation images after each epoch, as the tutorial does. Each measurement is the
    second of two epochs (the first traces and warms up), interleaved over `repeats` rounds;
    validation accuracy after the two epochs checks that speed did not cost accuracy."""
    split = data.split(data.load())
    baseline = _baseline()
    policy = objective.precision_policy("auto")
    rows = []
    for round_number in range(repeats):
        for batch_size in BATCH_SIZES:
            for trainer in ("plain fit (tutorial)", f"digitune ({policy})"):
                keras.utils.clear_session(free_memory=True)
                keras.utils.set_random_seed(round_number)
                timer = EpochTimes()
                if trainer.startswith("plain"):
                    cnn = baseline.fit(
                        split.x_train,
                        split.y_train,
                        batch_size,
                        2,
                        validation_data=(split.x_validation, split.y_validation),
                        callbacks=[timer],
                    )
                else:
                    keras.mixed_precision.set_global_policy(policy)
                    cnn = model.build_model({"batch_size": batch_size})
                    objective.fit(cnn, {"batch_size": batch_size}, split, 2, [timer])
                accuracy = cnn.evaluate(split.x_validation, split.y_validation, verbose=0)[1]
                rows.append(
                    {
                        "trainer": trainer,
                        "batch_size": batch_size,
                        "round": round_number,
                        "images_per_second": len(split.y_train) / timer.seconds[-1],
                        "val_accuracy": accuracy,
                    }
                )
    keras.mixed_precision.set_global_policy("float32")
    runs = pd.DataFrame(rows)
    table = (
        runs.groupby(["batch_size", "trainer"], sort=False)
        .agg(
            images_per_second=("images_per_second", "median"),
            val_accuracy=("val_accuracy", "median"),
            rounds=("round", "count"),
        )
        .reset_index()
    )
    plain = table[table["trainer"].str.startswith("plain")].set_index("batch_size")
    table["ratio_to_plain_fit"] = [
        row.images_per_second / plain.loc[row.batch_size, "images_per_second"]
        for row in table.itertuples()
    ]
    return table.round({"images_per_second": 0, "val_accuracy": 4, "ratio_to_plain_fit": 2})


def write_results(name: str, table: pd.DataFrame) -> Path:
    """bench/results/<name>.md and .csv, dated and with the machine, also logged to MLflow's
    `benchmarks` experiment. Returns the Markdown file."""
    folder = config.project_dir() / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU threads"
    markdown = folder / f"{name}.md"
    markdown.write_text(f"{name}, {stamp}, {machine}\n\n{markdown_table(table)}\n")
    table.to_csv(folder / f"{name}.csv", index=False)
    client = tracking.configure()
    with mlflow.start_run(
        experiment_id=tracking.experiment_id(client, "benchmarks"), run_name=f"{name} {stamp}"
    ):
        mlflow.log_artifact(str(markdown))
        mlflow.log_artifact(str(folder / f"{name}.csv"))
        mlflow.log_table(table, f"{name}.json")
    return markdown


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the tabulate package)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
