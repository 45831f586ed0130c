"""The trial function: build a CNN from the trial's params, train it with pruning, track it.

Kept thin on purpose: clear the Keras session, turn the trial into plain params, build,
fit with the pruning, early-stopping and tracking callbacks, and return the best
validation accuracy. The data is loaded once, outside the trial.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time

import keras
import optuna
import tensorflow as tf
from optuna_integration.keras import KerasPruningCallback

from digitune import config, data, evaluate, model, space, tracking


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite loss."""


# Set by the first Ctrl-C; trials stop at the next batch boundary.
STOP = threading.Event()


def stop_cleanly_on_ctrl_c() -> None:
    """Make the first Ctrl-C stop training at the next batch, the second at once.

    Python raises KeyboardInterrupt wherever the main thread happens to be, which can be in
    the middle of writing to the study's database; a half-written transaction then holds the
    database's lock while the trial's failure is recorded. Here Ctrl-C only sets a flag, and
    `StopOnRequest` raises the interrupt between batches, where nothing is being written.
    """

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        print("\nstopping after this batch (Ctrl-C again to stop at once)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)


class StopOnRequest(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at a batch boundary once Ctrl-C has been pressed.

    (Measured here: one epoch of 20,000 images took 4.4-5.5 s with or without it.)
    """

    def on_train_batch_begin(self, batch, logs=None):
        if STOP.is_set():
            raise KeyboardInterrupt

    on_test_batch_begin = on_train_batch_begin


def precision_policy(setting: str) -> str:
    """The Keras dtype policy a `precision` setting stands for on this machine."""
    if setting != "auto":
        return setting
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if config.cpu_has_bfloat16() else "float32"


class StopAtDeadline(keras.callbacks.Callback):
    """Ends training at the first epoch end after `deadline` (a `time.time()` value), so
    that a study's timeout bounds its wall time rather than only when the last trial starts.
    The trial still completes, with the best epoch it reached."""

    def __init__(self, deadline: float | None):
        super().__init__()
        self.deadline = deadline

    def on_epoch_end(self, epoch, logs=None):
        if self.deadline is not None and time.time() > self.deadline:
            self.model.stop_training = True


def fit(cnn: keras.Model, params: dict, split: data.Split, epochs: int, callbacks=()) -> dict:
    """Train `cnn` the way every trial does (the benchmark times this); Keras's history."""
    batch_size = int(params.get("batch_size", model.HYPERPARAMETER_DEFAULTS["batch_size"]))
    return cnn.fit(
        split.x_train,
        split.y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=(split.x_validation, split.y_validation),
        verbose=0,
        callbacks=list(callbacks),
    ).history


def make_objective(
    definition: space.StudyDefinition,
    split: data.Split,
    parent_run_id: str,
    deadline: float | None = None,
):
    """The function `study.optimize` calls once per trial. Trials log as children of
    `parent_run_id`; `deadline` is when the study's time is up (a `time.time()` value, the
    same in every worker process), or None."""
    training = definition.training
    keras.mixed_precision.set_global_policy(precision_policy(training.precision))

    def objective(trial: optuna.Trial) -> float:
        if STOP.is_set():
            raise KeyboardInterrupt
        keras.utils.clear_session(free_memory=True)
        # One seed per trial: a trial's initial weights and batch order can be reproduced.
        keras.utils.set_random_seed(definition.study.seed + trial.number)
        params = space.suggest(trial, definition)
        with tracking.trial_run(trial, params, parent_run_id):
            cnn = model.build_model(params)
            history = fit(
                cnn,
                params,
                split,
                training.max_epochs,
                callbacks=[
                    StopOnRequest(),
                    keras.callbacks.TerminateOnNaN(),
                    # Logs each epoch before the pruner can stop the trial after it.
                    tracking.EpochTimer(),
                    KerasPruningCallback(trial, config.OBJECTIVE_METRIC),
                    StopAtDeadline(deadline),
                    keras.callbacks.EarlyStopping(
                        monitor=config.OBJECTIVE_METRIC,
                        mode="max",
                        patience=training.early_stopping_patience,
                        restore_best_weights=True,
                    ),
                ],
            )
            epochs = len(history["loss"])
            trial.set_user_attr("epochs", epochs)
            if not all(math.isfinite(loss) for loss in history["loss"]):
                raise DivergedError(
                    f"the loss became {history['loss'][-1]} at epoch {epochs - 1}; "
                    f"learning_rate={params.get('learning_rate')} is probably too high"
                )
            # Early stopping restored the best epoch's weights, so the matrix matches the value.
            validation = evaluate.evaluate(cnn, split.x_validation, split.y_validation)
            tracking.log_evaluation(validation, "val", f"trial {trial.number}, validation set")
            tracking.log_weights(cnn)
            return max(history[config.OBJECTIVE_METRIC])

    return objective
