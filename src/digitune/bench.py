"""Benchmarks: measured side by side in one run, reported as medians and percentiles.

    digitune bench                                     all three below
    digitune bench --only throughput                   training throughput, digitune vs plain fit
    digitune bench --only race --budget-minutes 10     tuning race and tracking overhead
    digitune bench-serve --url http://127.0.0.1:8000   (with `make serve` running)

Benchmarks are not tests: the machines are shared and noisy, so they report numbers for a
person to read, and assert nothing.
"""

from __future__ import annotations

import dataclasses
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
from matplotlib.figure import Figure
from PIL import Image

from digitune import config, data, keras_tuner_engine, model, objective, space, tracking, tune

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
    steps = config.TrainingSettings.steps_per_execution
    rows = []
    for round_number in range(repeats):
        for batch_size in BATCH_SIZES:
            for trainer in ("plain fit (tutorial)", f"digitune ({policy}, {steps} steps/call)"):
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


RACE_EXPERIMENT = "tuning-race"
RACE_TARGET = 0.99


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    engine: str
    sampler: str = "tpe"
    pruner: str = "median"


CONTENDERS = (
    Contender("Optuna TPE + median pruning", "optuna"),
    Contender("Optuna random, no pruning", "optuna", sampler="random", pruner="none"),
    Contender("Keras Tuner Hyperband", "keras-tuner"),
)


def tuning_race(
    budget_minutes: float = 10.0, study_file: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Each contender tunes the default study for `budget_minutes` of wall clock, one after
    the other on this machine, from fresh state, tracked in MLflow's `tuning-race`
    experiment (nothing is registered). Returns (race table, tracking-overhead table,
    best-so-far curves), all read back from what the contenders logged to MLflow."""
    definition = space.load(study_file or config.default_study_file())
    folder = config.project_dir() / "bench" / "results" / "race"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parents = {}
    for contender in CONTENDERS:
        # Keras Tuner's study name gets "-keras-tuner-hyperband" added by its engine.
        suffix = f"-{contender.sampler}" if contender.engine == "optuna" else ""
        race_definition = dataclasses.replace(
            definition,
            study=dataclasses.replace(
                definition.study,
                name=f"race-{stamp}{suffix}",
                sampler=contender.sampler,
                pruner=contender.pruner,
                n_trials=10_000,  # The clock is the only budget.
                timeout_minutes=budget_minutes,
            ),
        )
        print(f"\n== {contender.name}: {budget_minutes:g} minutes ==")
        if contender.engine == "optuna":
            outcome = tune.run(
                race_definition,
                storage=f"sqlite:///{folder / (race_definition.study.name + '.db')}",
                register=False,
                experiment=RACE_EXPERIMENT,
            )
        else:
            outcome = keras_tuner_engine.run(
                race_definition,
                "hyperband",
                register=False,
                experiment=RACE_EXPERIMENT,
                directory=folder / race_definition.study.name,
            )
        parents[contender.name] = outcome.parent_run_id
    trials, curves = _race_trials(parents, definition.training.max_epochs)
    return _race_table(trials, curves, parents), _overhead_table(trials), curves


def _race_trials(parents: dict, max_epochs: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per trial run, and every epoch's validation accuracy with its time since the
    contender's start, from the MLflow store."""
    client = mlflow.MlflowClient()
    rows, points = [], []
    for contender, parent_id in parents.items():
        parent = client.get_run(parent_id)
        runs = client.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
        )
        dropped = keras_tuner_engine.dropped_by_successive_halving(
            [run.data.tags for run in runs], max_epochs
        )
        for run in runs:
            tags, metrics = run.data.tags, run.data.metrics
            number = int(tags["trial_number"])
            state = "PRUNED" if number in dropped else tags.get("state", "RUNNING")
            rows.append(
                {
                    "contender": contender,
                    "trial": number,
                    "state": state,
                    "trial_seconds": metrics.get("trial_seconds", np.nan),
                    "tracking_seconds": metrics.get("tracking_seconds", np.nan),
                    "matrix_evaluation_seconds": metrics.get("matrix_evaluation_seconds", np.nan),
                }
            )
            for point in client.get_metric_history(run.info.run_id, config.OBJECTIVE_METRIC):
                points.append(
                    {
                        "contender": contender,
                        "minutes": (point.timestamp - parent.info.start_time) / 60_000,
                        config.OBJECTIVE_METRIC: point.value,
                    }
                )
    curves = pd.DataFrame(points).sort_values(["contender", "minutes"])
    curves["best_val_accuracy"] = curves.groupby("contender")[config.OBJECTIVE_METRIC].cummax()
    return pd.DataFrame(rows), curves


def _race_table(trials: pd.DataFrame, curves: pd.DataFrame, parents: dict) -> pd.DataFrame:
    client = mlflow.MlflowClient()
    rows = []
    for contender, parent_id in parents.items():
        states = trials[trials["contender"] == contender]["state"].value_counts()
        curve = curves[curves["contender"] == contender]
        reached = curve[curve["best_val_accuracy"] >= RACE_TARGET]
        metrics = client.get_run(parent_id).data.metrics
        rows.append(
            {
                "contender": contender,
                "trials_started": int(states.sum()),
                "completed": int(states.get("COMPLETE", 0)),
                "pruned": int(states.get("PRUNED", 0)),
                "failed": int(states.get("FAIL", 0)),
                "best_val_accuracy": round(float(curve["best_val_accuracy"].max()), 4),
                f"minutes_to_{RACE_TARGET:.3f}": (
                    round(float(reached["minutes"].iloc[0]), 2) if len(reached) else np.nan
                ),
                "test_accuracy_of_best": round(metrics["test_accuracy"], 4),
            }
        )
    return pd.DataFrame(rows)


def race_summary(race: pd.DataFrame) -> str:
    """The race's targets in words: Optuna's time to the target over Hyperband's, and
    whether its best model is at least as accurate on the test set."""
    rows = race.set_index("contender")
    optuna_row, hyperband_row = rows.loc[CONTENDERS[0].name], rows.loc[CONTENDERS[2].name]
    column = f"minutes_to_{RACE_TARGET:.3f}"
    if np.isnan(optuna_row[column]) or np.isnan(hyperband_row[column]):
        timing = f"time to {RACE_TARGET:.1%}: not reached by both within the budget"
    else:
        ratio = optuna_row[column] / hyperband_row[column]
        timing = (
            f"time to {RACE_TARGET:.1%}: Optuna {optuna_row[column]:.2f} min, Hyperband "
            f"{hyperband_row[column]:.2f} min, ratio {ratio:.2f} (target at most 0.7)"
        )
    accuracy = (
        f"test accuracy of the best model: Optuna {optuna_row['test_accuracy_of_best']:.4f}, "
        f"Hyperband {hyperband_row['test_accuracy_of_best']:.4f}"
    )
    return f"{timing}\n{accuracy}"


def _overhead_table(trials: pd.DataFrame) -> pd.DataFrame:
    """MLflow logging time over trial wall time, and the validation pass that the logged
    confusion matrix needs, per contender (trials that ran to an end)."""
    ended = trials.dropna(subset=["trial_seconds", "tracking_seconds"])
    table = (
        ended.groupby("contender", sort=False)
        .agg(
            trials=("trial", "count"),
            median_trial_seconds=("trial_seconds", "median"),
            median_tracking_seconds=("tracking_seconds", "median"),
            total_trial_seconds=("trial_seconds", "sum"),
            total_tracking_seconds=("tracking_seconds", "sum"),
            total_matrix_evaluation_seconds=("matrix_evaluation_seconds", "sum"),
        )
        .reset_index()
    )
    table["tracking_percent"] = 100 * table.total_tracking_seconds / table.total_trial_seconds
    table["matrix_evaluation_percent"] = (
        100 * table.total_matrix_evaluation_seconds / table.total_trial_seconds
    )
    return table.round(2)


def plot_race(curves: pd.DataFrame) -> Figure:
    """Best validation accuracy so far against minutes since each contender started."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for contender, curve in curves.groupby("contender", sort=False):
        axes.step(curve["minutes"], curve["best_val_accuracy"], where="post", label=contender, lw=2)
    axes.axhline(RACE_TARGET, color="grey", ls="--", lw=1, label=f"{RACE_TARGET:.1%}")
    low = max(0.95, float(curves["best_val_accuracy"].min()) - 0.002)
    axes.set_ylim(low, 1.0)
    axes.set_xlabel("minutes since the contender started")
    axes.set_ylabel("best validation accuracy so far")
    axes.set_title("Tuning race on the default study, equal wall-clock budget")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure


def write_results(name: str, table: pd.DataFrame, figure: Figure | None = None) -> Path:
    """bench/results/<name>.md and .csv, dated and with the machine, also logged to MLflow's
    `benchmarks` experiment. Returns the Markdown file."""
    folder = config.project_dir() / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU threads"
    markdown = folder / f"{name}.md"
    markdown.write_text(f"{name}, {stamp}, {machine}\n\n{markdown_table(table)}\n")
    table.to_csv(folder / f"{name}.csv", index=False)
    if figure is not None:
        figure.savefig(folder / f"{name}.png", dpi=120)
    client = tracking.configure()
    with mlflow.start_run(
        experiment_id=tracking.experiment_id(client, "benchmarks"), run_name=f"{name} {stamp}"
    ):
        mlflow.log_artifact(str(markdown))
        mlflow.log_artifact(str(folder / f"{name}.csv"))
        mlflow.log_table(table, f"{name}.json")
        if figure is not None:
            mlflow.log_artifact(str(folder / f"{name}.png"))
    return markdown


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the tabulate package)."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)
