"""What a trained model costs where it is deployed: its weights, its int8 file, its latency.

- `params`: every weight the model holds (Keras's `count_params`, batch normalisation's
  moving statistics included), exact;
- `int8_kb`: the size of its full-integer int8 TFLite file (post-training quantization
  calibrated on training images, as `digitune export` makes it), exact, in KB of 1,000 bytes;
- `latency_ms`: the median time of one image through the form the API serves, the exported
  SavedModel's traced `serve` function (what the registered model's pyfunc calls), after a
  warm-up, with `latency_iqr_ms` (the interquartile range) for its spread and the threads
  TensorFlow computes with (`latency_threads`; trials of a 2-worker study on 2 cores have 1).

`measure` takes the model in float32, as it will be registered, whatever precision it
trained in.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from digitune import model, quiet

CALIBRATION_IMAGES = 500
WARM_UP_CALLS = 30
# Enough single-image calls that the median moves by less than its own spread between runs.
TIMED_CALLS = 300


def convert(saved_model: Path, kind: str, calibration: np.ndarray) -> bytes:
    """The TFLite flatbuffer of `saved_model` as float32, float16 or int8."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serve"])
    if kind == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[np.newaxis]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    # The converter prints its settings to the native stderr; a trial says what it measured.
    with contextlib.redirect_stdout(io.StringIO()), quiet.native_stderr_closed():
        return converter.convert()


def float32_copy(trained: keras.Model, params: dict) -> keras.Model:
    """The model as it is registered: in float32, without augmentation, `trained`'s weights."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        return model.for_deployment(trained, params)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def export_saved_model(cnn: keras.Model, folder: Path) -> Path:
    """`cnn` exported as the SavedModel the registry serves (Keras's `export`)."""
    with contextlib.redirect_stdout(io.StringIO()):
        cnn.export(str(folder), format="tf_saved_model", verbose=False)
    return folder


def latency(serve, image) -> tuple[float, float]:
    """The median and interquartile range, in ms, of `serve(image)` over TIMED_CALLS calls
    after WARM_UP_CALLS (`image` as `serve` takes it: a tensor, an array)."""
    for _ in range(WARM_UP_CALLS):
        serve(image)
    seconds = np.empty(TIMED_CALLS)
    for index in range(TIMED_CALLS):
        started = time.perf_counter()
        np.asarray(serve(image))  # the answer as the API hands it on
        seconds[index] = time.perf_counter() - started
    low, median, high = np.percentile(seconds * 1000, [25, 50, 75])
    return float(median), float(high - low)


def measure(cnn: keras.Model, calibration: np.ndarray) -> tuple[dict[str, float], bytes]:
    """The costs of a float32 model (see the module's docstring) and its int8 TFLite file."""
    with tempfile.TemporaryDirectory(prefix="digitune-costs-") as scratch:
        saved_model = export_saved_model(cnn, Path(scratch) / "model")
        int8 = convert(saved_model, "int8", calibration[:CALIBRATION_IMAGES])
        served = tf.saved_model.load(str(saved_model))
        median, spread = latency(served.serve, tf.constant(calibration[:1], tf.float32))
    costs = {
        "params": float(cnn.count_params()),
        "int8_kb": len(int8) / 1000,
        "latency_ms": median,
        "latency_iqr_ms": spread,
        "latency_threads": float(tf.config.threading.get_intra_op_parallelism_threads()),
    }
    return costs, int8
