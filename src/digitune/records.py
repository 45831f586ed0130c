"""What a run records besides its params and tags, and what can be read back from it.

- per-epoch metrics of training (`EpochTimer`, MLflow's Keras callback plus epoch times);
- confusion matrices (PNG and JSON) of an evaluation;
- a trial's weights, from which `load_model` rebuilds its model in float32 without
  retraining (for the registry, the refit and the ensembles).

Every write is timed into `tracking.STOPWATCH`, so a trial run's `tracking_seconds` says what
tracking cost it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import keras
import mlflow
import mlflow.keras

from digitune import data, evaluate, model, tracking

WEIGHTS_ARTIFACT = "weights/model.weights.h5"
INT8_ARTIFACT = "tflite/model-int8.tflite"


class EpochTimer(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, plus the wall time of each epoch as `epoch_seconds`.

    Its `on_test_end` is silenced: Keras already hands the validation metrics to
    `on_epoch_end` as `val_loss` and `val_accuracy`, and logging them twice clutters the UI.
    """

    def on_train_begin(self, logs=None):
        with tracking.STOPWATCH:
            super().on_train_begin(logs)
            # The precision the model really trains in, read off the model itself.
            mlflow.set_tag("precision", self.model.dtype_policy.name)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._epoch_started
        with tracking.STOPWATCH:
            super().on_epoch_end(epoch, logs)

    def on_test_end(self, logs=None):
        pass


def log_evaluation(
    evaluation: evaluate.Evaluation, prefix: str, title: str, class_names=None
) -> None:
    """Log the confusion matrix (PNG and JSON) to the active run, as `<prefix>_confusion_matrix`."""
    if class_names is not None:
        evaluation = dataclasses.replace(evaluation, class_names=tuple(class_names))
    with tracking.STOPWATCH:
        _log_evaluation(evaluation, prefix, title)


def _log_evaluation(evaluation: evaluate.Evaluation, prefix: str, title: str) -> None:
    mlflow.log_dict(evaluation.as_dict(), f"{prefix}_confusion_matrix.json")
    figure = evaluate.plot_confusion_matrix(
        evaluation.confusion_matrix, title, evaluation.class_names
    )
    mlflow.log_figure(figure, f"{prefix}_confusion_matrix.png")
    evaluate.plt.close(figure)


def log_weights(model) -> None:
    """Keep a trial's weights cheaply (an .h5 file, not a full MLflow model)."""
    with tracking.STOPWATCH, tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / Path(WEIGHTS_ARTIFACT).name
        model.save_weights(path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(WEIGHTS_ARTIFACT).parent))


def download_weights(run_id: str, destination: Path) -> Path:
    """The weights file a completed trial logged."""
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=str(destination)
            )
        )
    except Exception as error:  # noqa: BLE001 -- missing file, unreachable store, ...
        raise tracking.TrackingError(
            f"run {run_id} has no readable {WEIGHTS_ARTIFACT}: {error}"
        ) from None


def evaluate_validation(cnn: keras.Model, split: data.Split) -> evaluate.Evaluation:
    """The trained model on the validation images, timed apart from tracking."""
    with tracking.STOPWATCH.evaluating():
        return evaluate.evaluate(cnn, split.x_validation, split.y_validation)


def log_trial_result(cnn: keras.Model, validation: evaluate.Evaluation, number: int) -> None:
    """Log a finished trial's validation confusion matrix and weights to its run."""
    log_evaluation(validation, "val", f"trial {number}, validation set")
    log_weights(cnn)


def log_costs(measured: tuple[dict[str, float], bytes], accuracy: float) -> dict[str, float]:
    """Log a trial's deployment costs (`digitune.costs.measure`) to its run, as metrics the
    MLflow UI sorts by (`params`, `int8_kb`, `latency_ms`, `latency_iqr_ms`, and the
    objective `best_val_accuracy`: the best epoch's, where `val_accuracy` is the last's), and
    its int8 TFLite file; returns the costs."""
    costs, int8 = measured
    with tracking.STOPWATCH, tempfile.TemporaryDirectory() as scratch:
        mlflow.log_metrics({**costs, "best_val_accuracy": accuracy})
        path = Path(scratch) / Path(INT8_ARTIFACT).name
        path.write_bytes(int8)
        mlflow.log_artifact(str(path), artifact_path=str(Path(INT8_ARTIFACT).parent))
    return costs


def copy_int8_file(trial_run_id: str) -> None:
    """Log a trial's int8 TFLite file (`log_costs`) to the active run, beside the model that
    is registered from it."""
    with tempfile.TemporaryDirectory() as scratch:
        path = mlflow.artifacts.download_artifacts(
            run_id=trial_run_id, artifact_path=INT8_ARTIFACT, dst_path=scratch
        )
        mlflow.log_artifact(path, artifact_path=str(Path(INT8_ARTIFACT).parent))


def load_model(params: dict, run_id: str) -> keras.Model:
    """A trial's model, in float32 and without augmentation layers, from its params and the
    weights its run logged."""
    with tempfile.TemporaryDirectory() as scratch:
        # The registered model computes in float32 whatever precision the trials trained in:
        # it must run anywhere, and it is what the test accuracy is measured on.
        keras.mixed_precision.set_global_policy("float32")
        cnn = model.build_model(params)
        # The weights file holds the optimizer's state too; building the optimizer first lets
        # it load whole instead of warning that half the file was skipped.
        cnn.optimizer.build(cnn.trainable_variables)
        cnn.load_weights(download_weights(run_id, Path(scratch)))
    # Registered, exported and served without the augmentation that only training uses.
    return model.for_deployment(cnn, params)
