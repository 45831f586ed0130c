"""Track a study in MLflow: one experiment and one parent run per study, a child run per trial.

Layout, as a user sees it in the MLflow UI:
- experiment `<study name>`;
- one parent run per engine (tags `digitune.role=study`, `engine`, `algorithm`): `<study
  name>` for Optuna, `<study name> keras-tuner <algorithm>` for Keras Tuner, reused when the
  study resumes; it holds the resolved configuration, the datasets, and the final test
  evaluation;
- child runs `trial-<number>` with the sampled params, per-epoch `loss`, `accuracy`,
  `val_loss`, `val_accuracy` and `epoch_seconds` (step = epoch), tags `trial_number`,
  `engine` and `state` (COMPLETE, PRUNED, FAIL), and at the end `trial_seconds` and
  `tracking_seconds`; completed trials also log the validation confusion matrix (PNG and
  JSON) and their weights, so the best model can be rebuilt without retraining.

Optuna's own MLflowCallback is deprecated in Optuna 5 and logs only after a trial ends, so
the tracking is done here, with MLflow's Keras callback doing the per-epoch logging.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import mlflow.keras
import numpy as np
import optuna
from mlflow.entities import RunStatus

from digitune import config, evaluate

PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
WEIGHTS_ARTIFACT = "weights/model.weights.h5"


class Stopwatch:
    """Adds up the time a trial spends logging to MLflow (`with STOPWATCH:`) and evaluating
    the validation set for its confusion matrix (`with STOPWATCH.evaluating():`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.evaluation_seconds = 0.0
        self._depth = 0

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._started

    @contextlib.contextmanager
    def evaluating(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.evaluation_seconds += time.perf_counter() - started


# One trial runs at a time in a process, so one stopwatch per process is enough.
STOPWATCH = Stopwatch()


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


def configure() -> mlflow.MlflowClient:
    """Point MLflow at the configured store and check that it answers."""
    uri = config.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 -- any failure here means the store is unusable.
        raise TrackingError(
            f"cannot reach the MLflow tracking store {uri}: {error}\n"
            "Check MLFLOW_TRACKING_URI (or start the server); nothing was trained or changed."
        ) from None
    return client


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment `name`, created with its artifacts under mlruns/ if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = client.create_experiment(
            name, artifact_location=config.artifact_location(name)
        )
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    # Without this, MLflow 3's UI opens the experiment on its GenAI traces page; this makes
    # it open on the training runs, where trials are compared.
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    return experiment_id


def open_study_run(
    experiment_name: str,
    run_name: str,
    run_id: str | None,
    resolved_config: dict,
    datasets: dict,
    tags: dict[str, str],
) -> str:
    """Create a study's parent run, or reopen `run_id`, and return its id, left RUNNING.

    The caller keeps the id with the study (Optuna: the study's user attributes; Keras Tuner:
    its project folder), so a resumed study, and every worker on the same storage, logs its
    trials as children of this one run.
    """
    client = configure()
    experiment = experiment_id(client, experiment_name)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run_id = None  # The study moved to another tracking store: start afresh there.
    resumed = run_id is not None
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment,
        run_name=None if resumed else run_name,
        tags=None if resumed else {"digitune.role": "study", **tags},
    ) as run:
        if not resumed:
            mlflow.log_params(resolved_config)
            for context, dataset in datasets.items():
                mlflow.log_input(dataset, context=context)
        mlflow.log_dict(resolved_config, "config.json")
    # The block above ended the run; it stays open while trials run, in any process.
    client.update_run(run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return run.info.run_id


def close_study_run(run_id: str, error: BaseException | None = None) -> None:
    """End the parent run: FINISHED, or KILLED on Ctrl-C, or FAILED on an error."""
    status = _status_for(error) if error else RunStatus.to_string(RunStatus.FINISHED)
    mlflow.MlflowClient().set_terminated(run_id, status)


@contextlib.contextmanager
def trial_run(
    number: int,
    params: dict,
    parent_run_id: str,
    engine: str,
    remember: Callable[[str, object], None] = lambda key, value: None,
):
    """A child run `trial-<number>` of the study's parent run, ended with the trial's state.

    A pruned trial's run ends FINISHED with tag state=PRUNED; a failed one FAILED with the
    reason in tag `fail_reason` (also given to `remember`, which keeps it on the engine's own
    trial); an interrupted one KILLED. Every trial run ends with metrics `trial_seconds` and
    `tracking_seconds` (time spent logging to MLflow, which `make bench` reports).
    """
    started = time.perf_counter()
    STOPWATCH.reset()
    with STOPWATCH:
        parent = mlflow.MlflowClient().get_run(parent_run_id)
        run = mlflow.start_run(
            run_name=f"trial-{number}",
            experiment_id=parent.info.experiment_id,
            tags={
                "mlflow.parentRunId": parent_run_id,
                "trial_number": str(number),
                "engine": engine,
                "state": "RUNNING",
            },
        )
        remember(TRIAL_RUN_ATTR, run.info.run_id)
        mlflow.log_params(params)
    try:
        yield run
    except optuna.TrialPruned as pruned:
        _end_trial_run(started, _status_for(pruned), state="PRUNED", pruned_reason=str(pruned))
        raise
    except BaseException as error:
        reason = f"{type(error).__name__}: {error}"[:5000]
        if isinstance(error, Exception):
            remember("fail_reason", reason)
        _end_trial_run(started, _status_for(error), state="FAIL", fail_reason=reason)
        raise
    _end_trial_run(started, RunStatus.to_string(RunStatus.FINISHED), state="COMPLETE")


def _end_trial_run(started: float, status: str, **tags: str) -> None:
    with STOPWATCH:
        mlflow.set_tags(tags)
        mlflow.log_metrics(
            {
                "trial_seconds": time.perf_counter() - started,
                # Up to here: the last tag and these metrics are the only calls not counted.
                "tracking_seconds": STOPWATCH.seconds,
                "matrix_evaluation_seconds": STOPWATCH.evaluation_seconds,
            }
        )
        mlflow.end_run(status)


def end_stale_trial_run(trial: optuna.trial.FrozenTrial) -> None:
    """Mark the run of a trial whose worker died (no heartbeat) as KILLED, not RUNNING."""
    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if run_id is None:
        return
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "state", "FAIL")
    client.set_tag(run_id, "fail_reason", "its worker stopped sending heartbeats (killed?)")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def _status_for(error: BaseException) -> str:
    if isinstance(error, optuna.TrialPruned):
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


class EpochTimer(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, plus the wall time of each epoch as `epoch_seconds`.

    Its `on_test_end` is silenced: Keras already hands the validation metrics to
    `on_epoch_end` as `val_loss` and `val_accuracy`, and logging them twice clutters the UI.
    """

    def on_train_begin(self, logs=None):
        with STOPWATCH:
            super().on_train_begin(logs)
            # The precision the model really trains in, read off the model itself.
            mlflow.set_tag("precision", self.model.dtype_policy.name)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._epoch_started
        with STOPWATCH:
            super().on_epoch_end(epoch, logs)

    def on_test_end(self, logs=None):
        pass


def log_evaluation(evaluation: evaluate.Evaluation, prefix: str, title: str) -> None:
    """Log the confusion matrix (PNG and JSON) to the active run, as `<prefix>_confusion_matrix`."""
    with STOPWATCH:
        _log_evaluation(evaluation, prefix, title)


def _log_evaluation(evaluation: evaluate.Evaluation, prefix: str, title: str) -> None:
    mlflow.log_dict(evaluation.as_dict(), f"{prefix}_confusion_matrix.json")
    figure = evaluate.plot_confusion_matrix(evaluation.confusion_matrix, title)
    mlflow.log_figure(figure, f"{prefix}_confusion_matrix.png")
    evaluate.plt.close(figure)


def log_weights(model) -> None:
    """Keep a trial's weights cheaply (an .h5 file, not a full MLflow model)."""
    with STOPWATCH, tempfile.TemporaryDirectory() as scratch:
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
        raise TrackingError(f"run {run_id} has no readable {WEIGHTS_ARTIFACT}: {error}") from None


def dataset(images: np.ndarray, labels: np.ndarray, name: str, source: str, digest: str):
    """An MLflow dataset input for the runs' Datasets column."""
    with warnings.catch_warnings():
        # MLflow registers two equivalent sources for local paths and warns that it picked one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(
            images, targets=labels, source=source, name=name, digest=digest
        )
