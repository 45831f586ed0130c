"""Training throughput: digitune's trainer against the tutorial's plain `model.fit`.

    digitune bench --only throughput

One epoch of the 50,000 tuning images, both validating after each epoch, interleaved over
rounds, medians and the ratio to plain fit: the tutorial's CNN at batch 32 and 128, and the
default study's 3-block network with batch normalisation at batch 128. Besides one process on
every core, digitune's trainer is timed as the default study trains: its worker processes (2)
with their share of the threads (1 each on 2 cores), at once; its images per second are the
workers' together.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import time

import keras
import pandas as pd

from digitune import backend, config, data, model, study_file, trainer
from digitune.data import mnist
from digitune.engines import parallel

log = logging.getLogger(__name__)

# (network, batch size, digitune's params for it, the baseline's builder's name)
CASES = (
    ("tutorial CNN", 32, {}, "tutorial_model"),
    ("tutorial CNN", 128, {}, "tutorial_model"),
    (
        "3 blocks 32-64-128, batch norm",
        128,
        {
            "num_conv_blocks": 3,
            "num_filters": 32,
            "batch_normalization": True,
            "dense_units": 128,
            "dropout_rate": 0.2,
        },
        "study_network_model",
    ),
)


class EpochTimes(keras.callbacks.Callback):
    """Records each epoch's wall time and the share of one CPU core the process used in it
    (2.0 = two cores busy)."""

    def on_train_begin(self, logs=None):
        self.seconds, self.busy, self.spans = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._wall, self._cpu, self._began = time.perf_counter(), time.process_time(), time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._wall)
        self.busy.append((time.process_time() - self._cpu) / self.seconds[-1])
        self.spans.append((self._began, time.time()))


def _started() -> None:
    """A pool worker's start: nothing beyond what `backend.spawned` does first."""


def _train_two_epochs(params: dict, policy: str, seed: int) -> tuple:
    """In a worker process: digitune's trainer on `params` for two epochs; the second
    epoch's wall-clock span (start, end), its CPU seconds, validation accuracy, images."""
    split = data.split(mnist.load())
    keras.utils.clear_session(free_memory=True)
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(policy)
    cnn = model.build_model(params)
    timer = EpochTimes()
    trainer.fit(cnn, params, split, 2, [timer])
    accuracy = cnn.evaluate(split.x_validation, split.y_validation, verbose=0)[1]
    return (*timer.spans[-1], timer.busy[-1] * timer.seconds[-1], accuracy, len(split.y_train))


def _as_the_study_trains(
    params: dict, policy: str, seed: int, workers: int
) -> tuple[float, float, float]:
    """Images per second, CPU share and validation accuracy of one epoch of the trainer
    run as the default study runs it: `workers` processes with their share of the threads
    each, started at once. The images they trained in their second epochs over the time from
    the first of those epochs' start to the last one's end: where the workers' epochs do not
    overlap (a slow start), the figure is low, never high."""
    context = multiprocessing.get_context("spawn")
    threads = parallel.thread_share(workers)
    # The initializer through `backend.spawned`, which sets the worker's share of the threads
    # and loads the backend before this module does, as in the study's workers.
    environment = backend.worker_setup(0, workers, 0, threads)
    initializer, initargs = backend.spawn_call(_started, environment=environment)
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        results = pool.starmap(
            _train_two_epochs, [(params, policy, seed + index) for index in range(workers)], 1
        )
    began, ended = min(r[0] for r in results), max(r[1] for r in results)
    seconds = ended - began
    return (
        sum(r[4] for r in results) / seconds,
        sum(r[2] for r in results) / seconds,
        sum(r[3] for r in results) / workers,
    )


def _baseline():
    """bench/tutorial_baseline.py, the tutorial's plain `model.fit`, as a module."""
    path = config.project_dir() / "bench" / "tutorial_baseline.py"
    spec = importlib.util.spec_from_file_location("tutorial_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(network, trainer_name, batch_size, round_number, speed, busy, accuracy) -> dict:
    return {
        "network": network,
        "trainer": trainer_name,
        "batch_size": batch_size,
        "round": round_number,
        "images_per_second": speed,
        "cpu_percent": 100 * busy,
        "val_accuracy": accuracy,
    }


def training_throughput(repeats: int = 3) -> pd.DataFrame:
    """Images per second of one epoch on the 50,000 tuning images, for each of `CASES` (the
    tutorial's CNN at batch 32 and 128, a default-study network at 128): digitune's trainer
    (the trials' `trainer.fit` under the study's precision) against the tutorial's plain
    float32 `model.fit`, both validating on the 10,000 validation images after each epoch, as
    the tutorial does; and the same trainer run as the default study's workers run it, all at
    once (`_as_the_study_trains`). Each measurement is the second of two epochs (the first
    traces and warms up), interleaved over `repeats` rounds; validation accuracy after the
    two epochs checks that speed did not cost accuracy."""
    split = data.split(mnist.load())
    baseline = _baseline()
    policy = backend.precision("auto")[0]
    steps = config.TrainingSettings.steps_per_execution
    workers = study_file.load(config.default_study_file()).study.workers
    one_process = f"digitune ({policy}, {steps} steps/call)"
    as_the_study = f"digitune, {workers} workers of {parallel.thread_share(workers)} thread(s)"
    rows = []
    for round_number in range(repeats):
        for network, batch_size, params, baseline_network in CASES:
            params = {**params, "batch_size": batch_size}
            for name in ("plain fit (tutorial)", one_process, as_the_study):
                keras.utils.clear_session(free_memory=True)
                keras.utils.set_random_seed(round_number)
                timer = EpochTimes()
                if name == as_the_study:
                    speed, busy, accuracy = _as_the_study_trains(
                        params, policy, round_number, workers
                    )
                    rows.append(
                        _row(network, name, batch_size, round_number, speed, busy, accuracy)
                    )
                    continue
                if name.startswith("plain"):
                    cnn = baseline.fit(
                        split.x_train,
                        split.y_train,
                        batch_size,
                        2,
                        validation_data=(split.x_validation, split.y_validation),
                        callbacks=[timer],
                        network=getattr(baseline, baseline_network),
                    )
                else:
                    keras.mixed_precision.set_global_policy(policy)
                    cnn = model.build_model(params)
                    trainer.fit(cnn, params, split, 2, [timer])
                accuracy = cnn.evaluate(split.x_validation, split.y_validation, verbose=0)[1]
                speed = len(split.y_train) / timer.seconds[-1]
                rows.append(
                    _row(network, name, batch_size, round_number, speed, timer.busy[-1], accuracy)
                )
            for row in rows[-3:]:
                log.info(
                    f"throughput, round {round_number + 1} of {repeats}: {network}, batch "
                    f"{batch_size}, {row['trainer']}: {row['images_per_second']:,.0f} img/s, "
                    f"{row['cpu_percent']:.0f}% CPU"
                )
    keras.mixed_precision.set_global_policy("float32")
    runs = pd.DataFrame(rows)
    table = (
        runs.groupby(["network", "batch_size", "trainer"], sort=False)
        .agg(
            images_per_second=("images_per_second", "median"),
            cpu_percent=("cpu_percent", "median"),
            val_accuracy=("val_accuracy", "median"),
            rounds=("round", "count"),
        )
        .reset_index()
    )
    plain = table[table["trainer"].str.startswith("plain")].set_index(["network", "batch_size"])
    table["ratio_to_plain_fit"] = [
        row.images_per_second / plain.loc[(row.network, row.batch_size), "images_per_second"]
        for row in table.itertuples()
    ]
    return table.round(
        {"images_per_second": 0, "cpu_percent": 0, "val_accuracy": 4, "ratio_to_plain_fit": 2}
    )


# The default study's middle network, as a CPU trains it: what `backends_throughput` times.
STUDY_NETWORK = {
    "num_conv_blocks": 2,
    "num_filters": 32,
    "dense_units": 128,
    "dropout_rate": 0.2,
    "batch_normalization": True,
    "batch_size": 256,
}


def _backend_epoch(images: int) -> tuple[float, float]:
    """In a process of its own backend: images per second of the second of two epochs of
    `images` training images (validation included), and the first epoch's compilation."""
    split = data.split(mnist.load(), images)
    trainer.fresh_session("auto", seed=0)
    cnn = model.build_model(STUDY_NETWORK)
    history = trainer.fit(cnn, STUDY_NETWORK, split, 2, [trainer.EpochTimes()]).history
    compiling = next(iter(history.get("compile_seconds", [])), 0.0)
    return len(split.y_train) / history["epoch_seconds"][-1], compiling


def backends_throughput(repeats: int = 3, images: int = 10_000) -> pd.DataFrame:
    """The trainer on each backend installed here, side by side: a process per backend and
    round, interleaved over `repeats` rounds; medians, and the ratio to TensorFlow's."""
    context = multiprocessing.get_context("spawn")
    names = [name for name in backend.BACKENDS if backend.installed(name)]
    rows = []
    for round_number in range(repeats):
        for name in names:
            initializer, initargs = backend.spawn_call(
                _started, environment={"KERAS_BACKEND": name}
            )
            with context.Pool(1, initializer=initializer, initargs=initargs) as pool:
                speed, compiling = pool.apply(_backend_epoch, (images,))
            rows.append(
                {
                    "backend": name,
                    "round": round_number,
                    "images_per_second": speed,
                    "compile_seconds": compiling,
                }
            )
            log.info(
                f"backends, round {round_number + 1} of {repeats}: {name}, "
                f"{speed:,.0f} img/s, compiled in {compiling:.1f} s"
            )
    runs = pd.DataFrame(rows)
    table = (
        runs.groupby("backend", sort=False)
        .agg(
            images_per_second=("images_per_second", "median"),
            low=("images_per_second", "min"),
            high=("images_per_second", "max"),
            compile_seconds=("compile_seconds", "median"),
            rounds=("round", "count"),
        )
        .reset_index()
    )
    reference = table.set_index("backend")["images_per_second"].get("tensorflow")
    if reference:
        table["ratio_to_tensorflow"] = table["images_per_second"] / reference
    return table.round(2)
