"""Training throughput: digitune's trainer against the tutorial's plain `model.fit`.

    digitune bench --only throughput

One epoch of the 50,000 tuning images, both validating after each epoch, interleaved over
rounds, medians and the ratio to plain fit: the tutorial's CNN at batch 32 and 128, and the
default study's 3-block network with batch normalisation at batch 128.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import keras
import pandas as pd

from digitune import config, data, model, trainer

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
        self.seconds, self.busy = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._wall)
        self.busy.append((time.process_time() - self._cpu) / self.seconds[-1])


def _baseline():
    """bench/tutorial_baseline.py, the tutorial's plain `model.fit`, as a module."""
    path = config.project_dir() / "bench" / "tutorial_baseline.py"
    spec = importlib.util.spec_from_file_location("tutorial_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_throughput(repeats: int = 3) -> pd.DataFrame:
    """Images per second of one epoch on the 50,000 tuning images, for each of `CASES` (the
    tutorial's CNN at batch 32 and 128, a default-study network at 128): digitune's trainer
    (the trials' `trainer.fit` under the study's precision) against the tutorial's plain
    float32 `model.fit`, both validating on the 10,000 validation images after each epoch, as
    the tutorial does. Each measurement is the second of two epochs (the first traces and
    warms up), interleaved over `repeats` rounds; validation accuracy after the two epochs
    checks that speed did not cost accuracy."""
    split = data.split(data.load())
    baseline = _baseline()
    policy = trainer.precision_policy("auto")
    steps = config.TrainingSettings.steps_per_execution
    rows = []
    for round_number in range(repeats):
        for network, batch_size, params, baseline_network in CASES:
            params = {**params, "batch_size": batch_size}
            for name in ("plain fit (tutorial)", f"digitune ({policy}, {steps} steps/call)"):
                keras.utils.clear_session(free_memory=True)
                keras.utils.set_random_seed(round_number)
                timer = EpochTimes()
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
                log.info(
                    f"throughput, round {round_number + 1} of {repeats}: {network}, batch "
                    f"{batch_size}, {name}: {speed:,.0f} img/s, {100 * timer.busy[-1]:.0f}% CPU"
                )
                rows.append(
                    {
                        "network": network,
                        "trainer": name,
                        "batch_size": batch_size,
                        "round": round_number,
                        "images_per_second": speed,
                        "cpu_percent": 100 * timer.busy[-1],
                        "val_accuracy": accuracy,
                    }
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
