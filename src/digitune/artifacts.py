"""The files a run keeps, and reading them back: a trial's validation confusion matrix and
weights (from which `load_model` rebuilds its model without retraining) and int8 file, a
study's report, a registered version's TFLite files. Writes wait out an MLflow outage
(`tracking.persist`) and count into the trial's `tracking_seconds`.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import keras
import mlflow

from digitune import data, evaluate, model, outage, tracking

# A trial's weights and int8 file; a parent run's report and a version's TFLite files.
WEIGHTS_ARTIFACT = "weights/model.weights.h5"
INT8_ARTIFACT = "tflite/model-int8.tflite"
REPORT_FOLDER = "report"
TFLITE_FOLDER = "tflite"


def log_evaluation(
    evaluation: evaluate.Evaluation, prefix: str, title: str, class_names=None
) -> None:
    """Log the confusion matrix (PNG and JSON) to the active run, as `<prefix>_confusion_matrix`."""
    if class_names is not None:
        evaluation = dataclasses.replace(evaluation, class_names=tuple(class_names))
    with tracking.STOPWATCH:
        outage.persist(
            lambda: mlflow.log_dict(evaluation.as_dict(), f"{prefix}_confusion_matrix.json"), title
        )
        matrix, names = evaluation.confusion_matrix, evaluation.class_names
        figure = evaluate.plot_confusion_matrix(matrix, title, names)
        outage.persist(lambda: mlflow.log_figure(figure, f"{prefix}_confusion_matrix.png"))
        evaluate.plt.close(figure)


def log_weights(model) -> None:
    """Keep a trial's weights cheaply (an .h5 file, not a full MLflow model)."""
    with tracking.STOPWATCH, tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / Path(WEIGHTS_ARTIFACT).name
        model.save_weights(path)
        folder = str(Path(WEIGHTS_ARTIFACT).parent)
        outage.persist(lambda: mlflow.log_artifact(str(path), artifact_path=folder))


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
    """Log a trial's deployment costs (`deployment.measure`) to its run, as metrics the MLflow
    UI sorts by (`params`, `int8_kb`, `latency_ms`, `latency_iqr_ms`, beside the objective
    `best_val_accuracy`), and its int8 TFLite file; returns the costs."""
    costs, int8 = measured
    with tracking.STOPWATCH, tempfile.TemporaryDirectory() as scratch:
        metrics = {**costs, tracking.OBJECTIVE: accuracy}
        outage.persist(lambda: mlflow.log_metrics(metrics))
        path = Path(scratch) / Path(INT8_ARTIFACT).name
        path.write_bytes(int8)
        folder = str(Path(INT8_ARTIFACT).parent)
        outage.persist(lambda: mlflow.log_artifact(str(path), artifact_path=folder))
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
        return model.from_weights(params, download_weights(run_id, Path(scratch)))


def log_report(run_id: str, files: dict) -> None:
    """Log a study's report to its parent run under report/: each file name with its text
    (CSV) or its matplotlib figure."""
    client = mlflow.MlflowClient()
    for name, content in files.items():
        if isinstance(content, str):
            client.log_text(run_id, content, f"{REPORT_FOLDER}/{name}")
        else:
            client.log_figure(run_id, content, f"{REPORT_FOLDER}/{name}")


def log_tflite(run_id: str, paths: list[Path]) -> None:
    """Log a version's TFLite files and their table to its run, under tflite/."""
    client = mlflow.MlflowClient()
    for path in paths:
        client.log_artifact(run_id, str(path), TFLITE_FOLDER)
