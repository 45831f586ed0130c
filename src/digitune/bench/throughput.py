"""Training throughput: digitune's trainer against the tutorial's plain `model.fit`.

    digitune bench --only throughput

One epoch of the 50,000 tuning images at batch 32 and 128, both validating after each epoch,
interleaved over rounds, medians and the ratio to plain fit.
"""

from __future__ import annotations

import importlib.util
import time

import keras
import pandas as pd

from digitune import config, data, model, trainer

BATCH_SIZES = (32, 128)


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
    batch 32 and 128: digitune's trainer (the trials' `trainer.fit` under the study's
    precision) against the tutorial's plain float32 `model.fit`, both validating on the
    10,000 validation images after each epoch, as the tutorial does. Each measurement is the
    second of two epochs (the first traces and warms up), interleaved over `repeats` rounds;
    validation accuracy after the two epochs checks that speed did not cost accuracy."""
    split = data.split(data.load())
    baseline = _baseline()
    policy = trainer.precision_policy("auto")
    steps = config.TrainingSettings.steps_per_execution
    rows = []
    for round_number in range(repeats):
        for batch_size in BATCH_SIZES:
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
                    )
                else:
                    keras.mixed_precision.set_global_policy(policy)
                    cnn = model.build_model({"batch_size": batch_size})
                    trainer.fit(cnn, {"batch_size": batch_size}, split, 2, [timer])
                accuracy = cnn.evaluate(split.x_validation, split.y_validation, verbose=0)[1]
                rows.append(
                    {
                        "trainer": name,
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
