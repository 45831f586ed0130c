"""Export a registered version to TensorFlow Lite, small and fast for deployment.

    digitune export                  the @champion
    digitune export --version 3      a version by number (or --alias challenger)

Converts the version's SavedModel (what `mlflow.keras.log_model` exported) three ways: plain
float32, float16 weights, and full-integer int8 (post-training quantization calibrated on
500 training images; int8 input and output). Each is measured beside the Keras model on the
whole MNIST test set (accuracy) and on single images (median latency), and the files and the
table are logged as artifacts of the version's run (`tflite/`), the sizes as version tags.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf

from digitune import config, costs, data, datasets, quiet, registry, tracking

CALIBRATION_IMAGES = costs.CALIBRATION_IMAGES


class Interpreter:
    """A TFLite model that takes float images in [0, 1], quantizing them if it is int8."""

    def __init__(self, flatbuffer: bytes, batch: int):
        # It points at LiteRT's package (a warning; TF 2.21 still ships this one) and announces
        # its XNNPACK delegate on the native stderr.
        with warnings.catch_warnings(), quiet.native_stderr_closed():
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(model_content=flatbuffer)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        shape = [batch, *self.input["shape"][1:]]  # the model's own image shape
        self.interpreter.resize_tensor_input(self.input["index"], shape)
        with quiet.native_stderr_closed():
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
            batch = images[start : start + self.batch]
            if len(batch) < self.batch:  # The last, short batch: pad, then drop the padding.
                padded = np.zeros((self.batch, *batch.shape[1:]), batch.dtype)
                padded[: len(batch)] = batch
                rows.append(self(padded)[: len(batch)])
            else:
                rows.append(self(batch))
        return np.concatenate(rows)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(
    version: str | None = None, alias: str | None = None, model_name: str = registry.MODEL_NAME
) -> pd.DataFrame:
    """Export a version (default: @champion), measure it, log the files and the table."""
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
            f"version {number} is an ensemble (a Python model of several networks); TFLite "
            "exports one network: export one of its members' versions instead"
        )
    dataset = datasets.from_spec(model_version.tags.get("data_spec"))
    calibration = data.split(dataset).x_train[:CALIBRATION_IMAGES]
    test_images = data.preprocess(dataset.test_images)
    labels = dataset.test_labels
    keras_model = registry.load_pyfunc(model_version)

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(
            mlflow.artifacts.download_artifacts(f"models:/{model_name}/{number}", dst_path=scratch)
        )
        saved_model = folder / "data" / "model"
        if not (saved_model / "saved_model.pb").exists():
            raise ValueError(
                f"version {number} holds no exported SavedModel at data/model; only versions "
                "registered by digitune (`make tune`) can be exported"
            )
        rows = [
            {
                "format": "Keras SavedModel (float32)",
                "bytes": _size(saved_model / "variables"),
                "test_accuracy": float(
                    np.mean(keras_model.predict(test_images).argmax(1) == labels)
                ),
                "latency_ms": costs.latency(keras_model.predict, test_images[:1])[0],
            }
        ]
        files = []
        for kind in ("float32", "float16", "int8"):
            flatbuffer = costs.convert(saved_model, kind, calibration)
            path = Path(scratch) / f"{model_name}-v{number}-{kind}.tflite"
            path.write_bytes(flatbuffer)
            files.append(path)
            batched, single = Interpreter(flatbuffer, 500), Interpreter(flatbuffer, 1)
            rows.append(
                {
                    "format": f"TFLite {kind}",
                    "bytes": len(flatbuffer),
                    "test_accuracy": float(
                        np.mean(batched.predict(test_images).argmax(1) == labels)
                    ),
                    "latency_ms": costs.latency(single, test_images[:1])[0],
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
        for path in [*files, markdown, Path(scratch) / "tflite.csv"]:
            client.log_artifact(model_version.run_id, str(path), "tflite")
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
