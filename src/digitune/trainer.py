"""The trainer every engine, the refit and the benchmark share.

`fit` trains a model the way every trial does (batch size, learning-rate schedule, batches
per call into the backend), on TensorFlow or JAX; `training_callbacks` are the callbacks
every trial trains with besides its engine's pruning; `fresh_session` starts a trial in the
study's precision with its seed; the first Ctrl-C stops training cleanly at the next batch
(`StopOnRequest`).
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import threading
import time

import keras
import numpy as np

from digitune import backend, config, data, model, tracking

log = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite loss."""


# Validation images per batch: validating is inference, so the training batch size does not
# bind it, and big batches validate several times faster than a small training batch would.
VALIDATION_BATCH_SIZE = 1024

# Set by the first Ctrl-C or SIGTERM; trials stop at the next batch boundary.
STOP = threading.Event()
# The signal that set STOP (SIGINT for Ctrl-C, SIGTERM for `kill`, `docker stop`, Kubernetes
# and Slurm), or None.
STOP_SIGNAL: int | None = None


def stop_cleanly_on_ctrl_c() -> None:
    """Make the first Ctrl-C (or SIGTERM, which schedulers and `docker stop` send) stop
    training at the next batch, the second at once.

    Python raises KeyboardInterrupt wherever the main thread happens to be, which can be in
    the middle of writing to the study's database; a half-written transaction then holds the
    database's lock while the trial's failure is recorded. Here the signal only sets a flag,
    and `StopOnRequest` raises the interrupt between batches, where nothing is being written.
    Each command that calls it starts unstopped, whatever a signal did to an earlier one in
    the same process.
    """
    global STOP_SIGNAL
    STOP.clear()
    STOP_SIGNAL = None

    def handler(signum, frame):
        global STOP_SIGNAL
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP_SIGNAL = signum
        STOP.set()
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after this batch (again to stop at once)", name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class StopOnRequest(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at a batch boundary once Ctrl-C has been pressed.

    Checking a flag per batch costs nothing measurable against a batch of training.
    """

    def on_train_batch_begin(self, batch, logs=None):
        if STOP.is_set():
            raise KeyboardInterrupt

    on_test_batch_begin = on_train_batch_begin


def fresh_session(precision: str, seed: int) -> None:
    """Start a trial from a clean Keras state, in the study's precision, with its seed.

    `keras.utils.clear_session` also resets the global dtype policy to float32, so the
    policy is set after it, never before.
    """
    keras.utils.clear_session(free_memory=True)
    # What survives that collection (the backend, the data, the stores' clients) lives as long
    # as the process: frozen out of the next trials' collections, which then walk only what a
    # trial made. A full collection took about half a second a trial (docs/benchmarks.md).
    gc.freeze()
    keras.mixed_precision.set_global_policy(backend.precision(precision)[0])
    keras.utils.set_random_seed(seed)


class EpochTimes(keras.callbacks.Callback):
    """Adds to each epoch's logs its wall time (`epoch_seconds`), and once, as soon as it is
    known, `compile_seconds`: how much longer the first call of training and of validation
    took than the next ones, which is the backend tracing and compiling them."""

    def on_train_begin(self, logs=None):
        self.calls, self.reported = {"train": [], "test": []}, False
        self._call_started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = self._call_started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._time_call("train")

    def on_test_begin(self, logs=None):
        self._call_started = time.perf_counter()

    def on_test_batch_end(self, batch, logs=None):
        self._time_call("test")

    def _time_call(self, kind: str) -> None:
        now = time.perf_counter()
        if len(self.calls[kind]) < 8:
            self.calls[kind].append(now - self._call_started)
        self._call_started = now

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["epoch_seconds"] = time.perf_counter() - self._epoch_started
        validating = bool(self.calls["test"])
        known = len(self.calls["train"]) > 1 and (len(self.calls["test"]) > 1 or not validating)
        if known and not self.reported:
            self.reported = True
            logs["compile_seconds"] = sum(
                max(0.0, times[0] - float(np.median(times[1:])))
                for times in self.calls.values()
                if len(times) > 1
            )


class StopAtDeadline(keras.callbacks.Callback):
    """Ends training at the first epoch end after `deadline` (a `time.time()` value), so
    that a study's timeout bounds its wall time rather than only when the last trial starts.
    The trial still completes, with the best epoch it reached."""

    def __init__(self, deadline: float | None):
        super().__init__()
        self.deadline, self.stopped = deadline, False

    def on_epoch_end(self, epoch, logs=None):
        if self.deadline is not None and time.time() > self.deadline:
            self.model.stop_training = self.stopped = True


def fit(
    cnn: keras.Model,
    params: dict,
    split: data.Split,
    epochs: int,
    callbacks=(),
    initial_epoch: int = 0,
    settings: config.TrainingSettings | None = None,
) -> keras.callbacks.History:
    """Train `cnn` the way every trial of either engine does (the benchmark times this).

    An epoch is one pass over the training images, or `settings.epoch_images` of them: the
    next epoch then carries on through the same shuffled pass."""
    settings = settings or config.TrainingSettings()
    params = model.resolve_params(params)
    batch_size = int(params["batch_size"])
    # A setting of the training loop, not of the network: read when Keras builds its step.
    spe = cnn.steps_per_execution = settings.steps_per_execution
    callbacks = [*learning_rate_schedule(params, epochs), *callbacks]
    training = {"x": split.x_train, "y": split.y_train, "batch_size": batch_size}
    validation = (split.x_validation, split.y_validation)
    streamed = isinstance(split.x_train, data.Pictures)  # A folder, read as it trains.
    if streamed or 0 < settings.epoch_images < len(split.y_train):
        steps = math.ceil(len(split.y_train) / batch_size)
        if 0 < settings.epoch_images < len(split.y_train):
            # Whole calls into the backend: Keras runs `steps_per_execution` batches a call.
            steps = max(1, settings.epoch_images // batch_size // spe) * spe
        batches = (
            _numpy_batches(split.x_train, split.y_train, batch_size)
            if streamed
            else endless_batches(split.x_train, split.y_train, batch_size, keras.backend.backend())
        )
        # The batches are shuffled already; Keras would warn.
        training = {"x": batches, "shuffle": False, "steps_per_epoch": steps}
    if isinstance(split.x_validation, data.Pictures):
        validation = InOrder(split.x_validation, split.y_validation, VALIDATION_BATCH_SIZE)
    return cnn.fit(
        **training,
        epochs=epochs,
        initial_epoch=initial_epoch,
        # A refit trains on every training image and has nothing to validate on.
        validation_data=validation if len(split.y_validation) else None,
        validation_batch_size=VALIDATION_BATCH_SIZE,
        verbose=0,
        callbacks=list(callbacks),
    )


def images_per_epoch(settings: config.TrainingSettings, split: data.Split) -> int:
    """The training images an epoch of `fit` trains: `epoch_images`, or one whole pass."""
    whole = len(split.y_train)
    return settings.epoch_images if 0 < settings.epoch_images < whole else whole


def endless_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, name: str):
    """Batches of the training images without end, each pass in a new order, gathered by
    index as Keras does for arrays: on TensorFlow a tf.data pipeline that prepares them while
    the model trains, on other backends a NumPy generator. Both draw their order from the
    trial's seed (`keras.utils.set_random_seed` seeds TensorFlow's and NumPy's)."""
    if name != "tensorflow":
        return _numpy_batches(images, labels, batch_size)
    import tensorflow as tf

    images, labels = tf.constant(images), tf.constant(labels)
    count = int(labels.shape[0])
    return (
        tf.data.Dataset.range(count)
        # Without its own seed, the shuffle draws from TensorFlow's global one, which
        # `keras.utils.set_random_seed` (each trial's seed) sets.
        .shuffle(count, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
        .map(lambda index: (tf.gather(images, index), tf.gather(labels, index)))
        .prefetch(tf.data.AUTOTUNE)
    )


def _numpy_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
    rng = np.random.default_rng(np.random.randint(2**31))
    count, queue = len(labels), np.empty(0, np.int64)
    while True:
        while len(queue) < batch_size:  # Batches run on across the end of a pass.
            queue = np.concatenate([queue, rng.permutation(count)])
        batch, queue = queue[:batch_size], queue[batch_size:]
        yield images[batch], labels[batch]


class InOrder(keras.utils.PyDataset):
    """`images` and `labels` in batches of `batch_size`, in order, read as Keras asks for
    each: how a folder's validation pictures reach `fit` (`data.Pictures`)."""

    def __init__(self, images, labels: np.ndarray, batch_size: int):
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, index: int):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return np.asarray(self.images[rows]), self.labels[rows]


def learning_rate_schedule(params: dict, epochs: int) -> list[keras.callbacks.Callback]:
    """The trainer's side of `lr_schedule`: cosine decay over `epochs`, or halving the rate
    when validation accuracy has not improved for an epoch."""
    base = float(params["learning_rate"])
    if params["lr_schedule"] == "cosine":
        return [
            keras.callbacks.LearningRateScheduler(
                lambda epoch: base * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs)))
            )
        ]
    if params["lr_schedule"] == "plateau":
        return [
            keras.callbacks.ReduceLROnPlateau(
                monitor=config.OBJECTIVE_METRIC, mode="max", factor=0.5, patience=1, min_lr=1e-6
            )
        ]
    return []


def training_callbacks(
    training: config.TrainingSettings, deadline: float | None, epoch_images: int
) -> list:
    """The callbacks every trial of either engine trains with, besides the engine's own
    pruning: Ctrl-C, NaN, per-epoch tracking (`epoch_images` an epoch), the study's deadline,
    early stopping."""
    return [
        StopOnRequest(),
        keras.callbacks.TerminateOnNaN(),
        EpochTimes(),
        tracking.EpochLogger(epoch_images),
        StopAtDeadline(deadline),
        keras.callbacks.EarlyStopping(
            monitor=config.OBJECTIVE_METRIC,
            mode="max",
            patience=training.early_stopping_patience,
            restore_best_weights=True,
        ),
    ]


def check_finite(history: dict, params: dict) -> None:
    """Raise DivergedError if the loss became NaN or infinite."""
    if not all(math.isfinite(loss) for loss in history["loss"]):
        raise DivergedError(
            f"the loss became {history['loss'][-1]} at epoch {len(history['loss']) - 1}; "
            f"learning_rate={params.get('learning_rate')} is probably too high"
        )


# A network predicting one class for this share of the validation images has collapsed.
COLLAPSED_SHARE = 0.99


def check_learned(history: dict, params: dict, confusion_matrix: np.ndarray) -> None:
    """Raise DivergedError if training blew up: a NaN or infinite loss, or a network that
    collapsed to predicting one class while its loss did not fall (stayed where it started,
    or far above a uniform guess's). Where the loss overflows to NaN depends on the precision
    and the processor (bfloat16 on some CPUs never produces one), so collapse is checked too.
    A trial that learns slowly falls, however little, and is left to the pruner."""
    check_finite(history, params)
    predicted = np.asarray(confusion_matrix).sum(axis=0)
    share = predicted.max() / max(predicted.sum(), 1)
    losses = history["loss"]
    guess = math.log(len(predicted))  # the loss of a uniform guess
    not_falling = min(losses) > 2 * guess or (len(losses) > 1 and min(losses[1:]) >= losses[0])
    if share >= COLLAPSED_SHARE and not_falling:
        raise DivergedError(
            f"the network collapsed to predicting class {int(predicted.argmax())} for "
            f"{share:.0%} of the validation images and its loss did not fall "
            f"({losses[0]:.3g} at the first epoch, {losses[-1]:.3g} at the last); "
            f"learning_rate={params.get('learning_rate')} is probably too high"
        )
