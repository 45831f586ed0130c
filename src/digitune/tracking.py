"""Track a study in MLflow: the only module that knows the run layout.

Layout, as a user sees it in the MLflow UI:
- experiment `<study name>`;
- one parent run per engine (tags `digitune.role=study`, `engine`, `algorithm`): `<study
  name>` for Optuna, `<study name> keras-tuner <algorithm>` for Keras Tuner, reused when the
  study resumes; it holds the resolved configuration, the datasets, and the final test
  evaluation;
- child runs of the parent: `trial-<number>` with the sampled params, per-epoch `loss`,
  `accuracy`, `val_loss`, `val_accuracy` and `epoch_seconds` (step = epoch), tags
  `trial_number`, `engine` and `state` (COMPLETE, PRUNED, FAIL), and at the end
  `trial_seconds` and `tracking_seconds`; `refit-trial-<n>` and `ensemble-<k>` runs of the
  models built from the study afterwards. What each run records besides its params and tags
  (metrics per epoch, confusion matrices, weights) is `digitune.records`'s.

Optuna's own MLflowCallback is deprecated in Optuna 5 and logs only after a trial ends, so
the tracking is done here, with MLflow's Keras callback doing the per-epoch logging.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import optuna
from mlflow.entities import RunStatus

from digitune import config

# Where an Optuna study and its trials keep the ids of their MLflow runs (user attributes).
PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
_PARENT_TAG = "mlflow.parentRunId"


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
            f"cannot reach the MLflow tracking store {config.redact(uri)}: "
            f"{config.redact(str(error))}\n"
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


@contextlib.contextmanager
def study_run(
    experiment_name: str,
    run_name: str,
    run_id: str | None,
    resolved_config: dict,
    datasets: dict,
    tags: dict[str, str],
) -> Iterator[str]:
    """A study's parent run, created or reopened (`run_id`), as a context: yields its id,
    then ends it FINISHED, or KILLED on Ctrl-C, or FAILED on an error.

    The caller keeps the id with the study (Optuna: the study's user attributes; Keras Tuner:
    its project folder), so a resumed study, and every worker on the same storage, logs its
    trials as children of this one run. The run stays RUNNING, not active in this process,
    while trials run in any process.
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
    run_id = run.info.run_id
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    try:
        yield run_id
    except BaseException as error:
        client.set_terminated(run_id, _status_for(error))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def child_run(parent_run_id: str, run_name: str, tags: dict[str, str]) -> mlflow.ActiveRun:
    """Start a run under the study's parent run, in the parent's experiment."""
    parent = mlflow.MlflowClient().get_run(parent_run_id)
    return mlflow.start_run(
        run_name=run_name,
        experiment_id=parent.info.experiment_id,
        parent_run_id=parent_run_id,
        tags=tags,
    )


def child_runs(parent_run_id: str, filter_string: str = "") -> list[mlflow.entities.Run]:
    """The runs under a parent run (its trials, refits, ensembles), optionally filtered."""
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    condition = f"tags.`{_PARENT_TAG}` = '{parent_run_id}'"
    return client.search_runs(
        [parent.info.experiment_id],
        f"{condition} and {filter_string}" if filter_string else condition,
        max_results=10_000,
    )


def parent_of(run: mlflow.entities.Run) -> str | None:
    """The id of the run a child run belongs to, if any."""
    return run.data.tags.get(_PARENT_TAG)


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
        run = child_run(
            parent_run_id,
            f"trial-{number}",
            {"trial_number": str(number), "engine": engine, "state": "RUNNING"},
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


def end_stale_trial_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """Mark the run of a trial whose worker died as KILLED, not RUNNING, with `reason`."""
    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if run_id is None:
        return
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "state", "FAIL")
    client.set_tag(run_id, "fail_reason", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def _status_for(error: BaseException) -> str:
    if isinstance(error, optuna.TrialPruned):
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


def dataset(images: np.ndarray, labels: np.ndarray, name: str, source: str, digest: str):
    """An MLflow dataset input for the runs' Datasets column."""
    with warnings.catch_warnings():
        # MLflow registers two equivalent sources for local paths and warns that it picked one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(
            images, targets=labels, source=source, name=name, digest=digest
        )
