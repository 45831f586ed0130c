"""What a trained model costs where it is deployed, its TensorFlow Lite files, and choosing a
model for a device.

Costs (`measure`), for every completed trial of a study with an [objectives] table:
- `params`: every weight the model holds (Keras's `count_params`, batch normalisation's
  moving statistics included), exact;
- `int8_kb`: the size of its full-integer int8 TFLite file (post-training quantization
  calibrated on training images, as `digitune export` makes it), exact, in KB of 1,000 bytes;
- `latency_ms`: the median time of one image through the exported SavedModel's traced
  `serve` function (about as fast as the Keras inference step that `digitune serve` calls on
  the registered Keras file; docs/benchmarks.md), after a warm-up, with `latency_iqr_ms`
  (the interquartile range) for its spread and the threads TensorFlow computes with
  (`latency_threads`; trials of a 2-worker study on 2 cores have 1).
`measure` takes the model in float32, as it will be registered, whatever precision it trained in.

    digitune export [--version 3 | --alias challenger]
    digitune select --study studies/edge.toml --max-params 10000 [--max-kb K] [--max-latency-ms X]

`export` converts a registered version's SavedModel three ways (float32, float16 weights, and
full-integer int8 with int8 input and output) and measures each beside the Keras model on the
whole test set (accuracy) and on single images (median latency); the files and the table are
logged to the version's run (`tflite/`), the sizes as version tags.

`select` takes the most accurate trial on the study's Pareto front (`digitune.pareto`) within
the given limits, chosen on validation accuracy and costs only; then tests it (the first time
the test set sees it), registers it with every objective as tags and its int8 file beside it,
and points @challenger at it, so that it goes through the same `make promote` gate as any
other model. Its latency is measured once more through the registered model itself, as
`digitune serve` loads it (`served_latency_ms`). A trial registered before is not registered
twice: @challenger moves to its version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import time
import warnings
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd

from digitune import (
    artifacts,
    backend,
    config,
    data,
    loader,
    model,
    pareto,
    registry,
    study,
    tracking,
)

CALIBRATION_IMAGES = 500
# Test images per call of a TFLite interpreter that `export` measures accuracy with.
INTERPRETER_BATCH = 500
WARM_UP_CALLS = 30
# Enough single-image calls that the median moves by less than its own spread between runs.
TIMED_CALLS = 300


def tensorflow():
    """TensorFlow, which SavedModels and TFLite files need whatever backend trained the model;
    a RuntimeError that says so where it is not installed."""
    if not backend.installed("tensorflow"):
        raise RuntimeError(
            "deployment costs, SavedModels and TFLite files need TensorFlow, which is not "
            "installed here: pip install tensorflow, or tune on the TensorFlow backend"
        )
    import tensorflow as tf

    return tf


def convert(saved_model: Path, kind: str, calibration: np.ndarray) -> bytes:
    """The TFLite flatbuffer of `saved_model` as float32, float16 or int8."""
    tf = tensorflow()
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
    with contextlib.redirect_stdout(io.StringIO()), backend.native_stderr_captured():
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
    """`cnn` exported as a SavedModel (Keras's `export`), which TFLite converts from."""
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
    tf = tensorflow()
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


class Interpreter:
    """A TFLite model that takes float images in [0, 1], quantizing them if it is int8."""

    def __init__(self, flatbuffer: bytes, batch: int):
        tf = tensorflow()
        # It points at LiteRT's package (a warning; TF 2.21 still ships this one) and announces
        # its XNNPACK delegate on the native stderr.
        with warnings.catch_warnings(), backend.native_stderr_captured():
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(model_content=flatbuffer)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        shape = [batch, *self.input["shape"][1:]]  # the model's own image shape
        self.interpreter.resize_tensor_input(self.input["index"], shape)
        with backend.native_stderr_captured():
            self.interpreter.allocate_tensors()
        self.batch = batch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        scale, zero_point = self.input["quantization"]
        if self.input["dtype"] == np.int8:
            images = np.clip(np.round(images / scale + zero_point), -128, 127).astype(np.int8)
        self.interpreter.set_tensor(self.input["index"], images.astype(self.input["dtype"]))
        self.interpreter.invoke()
        output = self.interpreter.get_tensor(self.output["index"])
        scale, zero_point = self.output["quantization"]
        if self.output["dtype"] == np.int8:
            output = (output.astype(np.float32) - zero_point) * scale
        return output

    def predict(self, images: np.ndarray) -> np.ndarray:
        rows = []
        for start in range(0, len(images), self.batch):
            batch = np.asarray(images[start : start + self.batch])  # `data.Pictures` too.
            if len(batch) < self.batch:  # The last, short batch: pad, then drop the padding.
                padded = np.zeros((self.batch, *batch.shape[1:]), batch.dtype)
                padded[: len(batch)] = batch
                rows.append(self(padded)[: len(batch)])
            else:
                rows.append(self(batch))
        return np.concatenate(rows)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export(
    version: str | None = None, alias: str | None = None, model_name: str = registry.MODEL_NAME
) -> pd.DataFrame:
    """`digitune export`: convert a version (default: @champion) to TFLite float32, float16
    and int8, measure each, log the files and the table."""
    client = tracking.configure()
    if version is not None:
        try:
            model_version = client.get_model_version(model_name, version)
        except mlflow.exceptions.MlflowException:
            raise registry.RegistryError(
                f"'{model_name}' has no version {version}; see `make models`"
            ) from None
    else:
        model_version = registry.version_by_alias(
            client, alias or config.CHAMPION_ALIAS, model_name=model_name
        )
    number = str(model_version.version)
    if model_version.tags.get("kind") == "ensemble":
        raise ValueError(
            f"version {number} is an ensemble (several networks averaged); TFLite "
            "exports one network: export one of its members' versions instead"
        )
    dataset = data.from_spec(model_version.tags.get("data_spec"))
    calibration = np.asarray(data.split(dataset).x_train[:CALIBRATION_IMAGES])
    test_images = data.preprocess(dataset.test_images)  # A folder's: read a batch at a time.
    first = np.asarray(test_images[:1])
    labels = dataset.test_labels
    registered = loader.load(model_version)

    with tempfile.TemporaryDirectory() as scratch:
        # The SavedModel TFLite converts from, made here from the Keras file loaded in safe
        # mode: a registered version holds no TensorFlow program of its own.
        saved_model = export_saved_model(registered.network, Path(scratch) / "saved_model")
        rows = [
            {
                "format": "Keras SavedModel (float32)",
                "bytes": _size(saved_model / "variables"),
                "test_accuracy": float(
                    np.mean(registered.predict(test_images).argmax(1) == labels)
                ),
                "latency_ms": latency(registered.predict, first)[0],
            }
        ]
        files = []
        for kind in ("float32", "float16", "int8"):
            flatbuffer = convert(saved_model, kind, calibration)
            path = Path(scratch) / f"{model_name}-v{number}-{kind}.tflite"
            path.write_bytes(flatbuffer)
            files.append(path)
            batched = Interpreter(flatbuffer, INTERPRETER_BATCH)
            single = Interpreter(flatbuffer, 1)
            rows.append(
                {
                    "format": f"TFLite {kind}",
                    "bytes": len(flatbuffer),
                    "test_accuracy": float(
                        np.mean(batched.predict(test_images).argmax(1) == labels)
                    ),
                    "latency_ms": latency(single, first)[0],
                }
            )
        table = pd.DataFrame(rows)
        float32 = table.loc[table["format"] == "TFLite float32"].iloc[0]
        table["size_ratio_to_float32"] = float32["bytes"] / table["bytes"]
        table["accuracy_change_points"] = 100 * (table["test_accuracy"] - float32["test_accuracy"])
        table = table.round(
            {
                "test_accuracy": 4,
                "latency_ms": 3,
                "size_ratio_to_float32": 2,
                "accuracy_change_points": 2,
            }
        )
        markdown = Path(scratch) / "tflite.md"
        markdown.write_text(
            f"{model_name} version {number}, {dataset.name} test set ({len(labels):,} images)\n\n"
            f"{table.to_markdown(index=False)}\n"
        )
        table.to_csv(Path(scratch) / "tflite.csv", index=False)
        artifacts.log_tflite(model_version.run_id, [*files, markdown, Path(scratch) / "tflite.csv"])
    for row in table.itertuples():
        key = row.format.split(" ")[-1].strip("()")
        if row.format.startswith("TFLite"):
            client.set_model_version_tag(model_name, number, f"tflite_{key}_bytes", str(row.bytes))
            client.set_model_version_tag(
                model_name,
                number,
                f"tflite_{key}_test_accuracy",
                f"{row.test_accuracy:.4f}",
            )
    return table


@dataclasses.dataclass(frozen=True)
class Selected:
    trial: int
    validation_accuracy: float
    test_accuracy: float
    costs: dict
    model_name: str
    version: str
    served_latency_ms: float


def select(study_file: str | Path, storage: str | None, limits: dict[str, float]) -> Selected:
    """`digitune select`: test and register the most accurate front model within `limits`."""
    tracking.configure()
    definition, optuna_study = study.load_existing(study_file, storage)
    trials = pareto.table(optuna_study)
    if trials.empty:
        raise ValueError(
            f"study '{optuna_study.study_name}' has no completed trial that measured its costs; "
            f"give {study_file} an [objectives] table (see studies/edge.toml) and tune it"
        )
    chosen = pareto.choose(trials, pareto.front_costs(definition.objectives), limits)
    number = int(chosen["trial"])
    dataset = data.load(definition.data)
    best = registry.BestTrial.of(optuna_study, number)
    parent_run_id = optuna_study.user_attrs[tracking.PARENT_RUN_ATTR]
    wanted = {f"select_max_{cost}": limit for cost, limit in limits.items()}
    with tracking.select_run(parent_run_id, number) as run:
        mlflow.log_params(wanted or {"select_max": "none"})
    test_accuracy, version = registry.register_best(
        best, definition, dataset, parent_run_id, run_id=run.info.run_id
    )
    model_name = definition.model_name
    client = mlflow.MlflowClient()
    registered = client.get_model_version(model_name, version)
    served = loader.load(registered)
    image = data.preprocess(dataset.test_images[:1]).astype(np.float32)
    served_latency, _ = latency(served.predict, image)
    registry.describe_version(
        version,
        {
            **pareto.version_tags(best.costs),
            "served_latency_ms": f"{served_latency:.3f}",
            **{key: f"{value:g}" for key, value in wanted.items()},
        },
        registered.description,
        config.CHALLENGER_ALIAS,
        model_name,
    )
    return Selected(
        number,
        best.validation_accuracy,
        test_accuracy,
        dict(best.costs or {}),
        model_name,
        version,
        served_latency,
    )
