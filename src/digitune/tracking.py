"""Track a study in MLflow: its runs, their names, tags and metrics (files: `artifacts`).

Layout, as a user sees it in the MLflow UI:
- experiment `<study name>`;
- one parent run per engine (tags `digitune.role=study`, `engine`, `algorithm`), named by
  `parent_run_name`: the resolved configuration as params and `config.json`, the datasets,
  the best model's test evaluation and the study's report (`report/`). A resumed study
  reopens it, and refuses a study file whose settings differ from the params it started with;
- a child run per trial, `trial-0007`: its params; per epoch `loss`, `accuracy`, `val_loss`,
  `val_accuracy`, `epoch_seconds` and the objective so far, `best_val_accuracy` (what the
  engines rank trials by: sort the runs table by it), each at step = training images seen;
  tags `trial_number` (zero-padded, so that it sorts), `engine`, `state` (COMPLETE, PRUNED,
  FAIL) and `precision`; at its end `trial_seconds` and `tracking_seconds`; a completed
  trial's validation confusion matrix and weights (from which `load_model` rebuilds its model
  without retraining) and, in a study with [objectives], its costs and int8 file;
- child runs of the models made from the study afterwards: `refit-trial-0007`,
  `ensemble-<k>` and `select-trial-0007`.

Every write of a trial is timed into `STOPWATCH`, so its `tracking_seconds` says what tracking
cost it. Optuna's own MLflowCallback is deprecated in Optuna 5 and logs only after a trial
ends, so the tracking is done here, on MLflow's Keras callback.

A trial's writes outlast an MLflow outage (`persist`): while the store does not answer, the
trial waits for it, saying so in one line, and then writes what it had; its epochs' metrics,
logged in the background, are confirmed at its end and written again where they were lost.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import mlflow.keras
import numpy as np
import optuna
from mlflow.entities import RunStatus

from digitune import backend, config, outage

log = logging.getLogger(__name__)
# Where an Optuna study and its trials keep the ids of their MLflow runs (user attributes).
PARENT_RUN_ATTR = "mlflow_parent_run_id"
TRIAL_RUN_ATTR = "mlflow_run_id"
_PARENT_TAG = "mlflow.parentRunId"
# The objective every engine ranks trials by, as a trial run's metric.
OBJECTIVE = "best_val_accuracy"
# A parent run's resolved configuration (the files of trials and versions: `artifacts`).
CONFIG_ARTIFACT = "config.json"
# Settings of one invocation, not of the study: they may change when it resumes, and are in
# config.json but not among the parent run's params.
INVOCATION_KEYS = {
    "study.n_trials",
    "study.timeout_minutes",
    "study.workers",
    "study.heartbeat_seconds",
    "study.heartbeat_grace_seconds",
    "study.max_retries",
    "study_file",
}


def runs_page(parent_run_id: str) -> str:
    """The address of a study's runs in the MLflow UI, on its model-training view (MLflow 3
    opens experiments on its GenAI view), trials sorted by the objective: the tracking
    server's own UI, or `digitune ui`'s for a local store."""
    uri = config.tracking_uri()
    remote = uri.startswith(("http://", "https://"))
    ui = config.redact(uri.rstrip("/")) if remote else "http://127.0.0.1:5000"
    experiment = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id
    return (
        f"{ui}/#/experiments/{experiment}/runs?workflowType=machine_learning"
        f"&orderByKey=metrics.%60{OBJECTIVE}%60&orderByAsc=false"
    )


def trial_tag(number: int | str) -> str:
    """A trial's number as its runs say it: zero-padded, so that the MLflow UI sorts it."""
    return f"{int(number):04d}"


def parent_run_name(study_name: str, engine: str, algorithm: str) -> str:
    """The parent run of a study: its name for Optuna, with the engine's for another."""
    return study_name if engine == "optuna" else f"{study_name} {engine} {algorithm}"


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


def configure(create: bool = False) -> mlflow.MlflowClient:
    """Point MLflow at the configured store and check that it answers. A local SQLite store
    that is not there yet is made only with `create` (the commands that record runs); any
    other command run outside a project says so rather than leave an empty mlruns/ there."""
    uri = config.tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not create and not path.exists():
            raise TrackingError(
                f"no MLflow store at {path}: nothing was tuned in {config.project_dir()}; run "
                "digitune in the project folder where `make tune` ran, or set DIGITUNE_HOME "
                "(or MLFLOW_TRACKING_URI) to it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
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
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=config.artifact_location(name)
            )
        except mlflow.exceptions.MlflowException as error:
            # Workers starting together: another made it between the look and the create.
            experiment = client.get_experiment_by_name(name)
            if error.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                raise
    if experiment is not None:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
    # Without this, MLflow 3's UI opens the experiment on its GenAI traces page; this makes
    # it open on the training runs, where trials are compared.
    kind = ("mlflow.experimentKind", "custom_model_development")
    if experiment is not None and experiment.tags.get(kind[0]) == kind[1]:
        return experiment_id  # Tagged already: no write, nothing for workers to race on.
    try:
        client.set_experiment_tag(experiment_id, *kind)
    except mlflow.exceptions.MlflowException:
        # Two workers tagging at once: the other's tag is the same one.
        if client.get_experiment(experiment_id).tags.get(kind[0]) != kind[1]:
            raise
    return experiment_id


@contextlib.contextmanager
def study_run(
    experiment_name: str,
    run_name: str,
    run_id: str | None,
    resolved_config: dict,
    datasets: dict,
    tags: dict[str, str],
    claim: Callable[[str, str | None], str] | None = None,
    others_running: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """A study's parent run, created or reopened (`run_id`), as a context: yields its id,
    then ends it FINISHED, or KILLED on Ctrl-C, or FAILED on an error; left RUNNING while
    `others_running()` says other workers still run its trials (the last one ends it).

    The caller keeps the id with the study (Optuna: the study's user attributes; Keras Tuner:
    its project folder), so a resumed study, and every worker on the same storage, logs its
    trials as children of this one run. A new run is offered to `claim(new_id, old_id)`,
    which returns the run the study keeps: of workers starting together, each makes one and
    one wins; the others delete theirs and reopen the winner's.
    """
    client = configure()
    experiment = experiment_id(client, experiment_name)
    stale = None
    if run_id is not None:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            # The study moved to another tracking store: start afresh there.
            stale, run_id = run_id, None
    params = {key: value for key, value in resolved_config.items() if key not in INVOCATION_KEYS}
    if run_id is None:
        run_id = _new_study_run(experiment, run_name, params, datasets, tags)
        kept = claim(run_id, stale) if claim is not None else run_id
        if kept != run_id:
            client.delete_run(run_id)  # Another worker's run came first.
            run_id = kept
    _check_unchanged(client.get_run(run_id), params, experiment_name)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(resolved_config, CONFIG_ARTIFACT)
    client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    try:
        yield run_id
    except BaseException as error:
        if not others_running():
            client.set_terminated(run_id, _status_for(error))
        raise
    if not others_running():
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def _new_study_run(experiment: str, run_name: str, params: dict, datasets: dict, tags: dict):
    """A new parent run with the study's settings as params and its datasets; its id."""
    with mlflow.start_run(
        experiment_id=experiment, run_name=run_name, tags={"digitune.role": "study", **tags}
    ) as run:
        mlflow.log_params(params)
        for context, dataset in datasets.items():
            mlflow.log_input(dataset, context=context)
    return run.info.run_id


def _check_unchanged(run: mlflow.entities.Run, params: dict, study_name: str) -> None:
    """A ValueError naming each setting that differs from the params the study started with:
    its trials were tuned under those, and a resumed study keeps them."""
    logged = run.data.params
    changed = [
        f"{key} = {logged.get(key, '(unset)')} when it started, now {value}"
        for key, value in params.items()
        if logged.get(key) != str(value)[:6000]
    ]
    if changed:
        raise ValueError(
            f"study '{study_name}' cannot resume with other settings than it started with "
            f"(its MLflow parent run's params): {'; '.join(changed)}. Put them back, or give "
            "the study a new name in [study] to start afresh; budgets (n_trials, "
            "timeout_minutes, workers) may change"
        )


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


@contextlib.contextmanager
def trial_run(
    number: int,
    params: dict,
    parent_run_id: str,
    engine: str,
    remember: Callable[[str, object], None] = lambda key, value: None,
):
    """A child run `trial-0007` of the study's parent run, ended with the trial's state.

    A pruned trial's run ends FINISHED with tag state=PRUNED; a failed one FAILED with the
    reason in tag `fail_reason` (also given to `remember`, which keeps it on the engine's own
    trial); an interrupted one KILLED. Every trial run ends with metrics `trial_seconds` and
    `tracking_seconds` (time spent logging to MLflow, which `make bench` reports).
    """
    started = time.perf_counter()
    STOPWATCH.reset()
    _UNCONFIRMED.clear()
    what = outage.WRITER[0] = f"trial {number}"
    with STOPWATCH:
        run = outage.persist(
            lambda: child_run(
                parent_run_id,
                f"trial-{trial_tag(number)}",
                {"trial_number": trial_tag(number), "engine": engine, "state": "RUNNING"},
            )
        )
        remember(TRIAL_RUN_ATTR, run.info.run_id)
        outage.persist(lambda: mlflow.log_params(params))
    try:
        yield run
    except optuna.TrialPruned as pruned:
        _end_trial_run(
            started, what, _status_for(pruned), state="PRUNED", pruned_reason=str(pruned)
        )
        raise
    except BaseException as error:
        reason = config.redact(f"{type(error).__name__}: {error}")[:5000]
        if isinstance(error, Exception):
            remember("fail_reason", reason)
        _end_trial_run(started, what, _status_for(error), state="FAIL", fail_reason=reason)
        raise
    _end_trial_run(started, what, RunStatus.to_string(RunStatus.FINISHED), state="COMPLETE")


def _end_trial_run(started: float, what: str, status: str, **tags: str) -> None:
    """Record how the active trial run ended and end it. It waits out an outage, except for
    an interrupted trial, which records what it can at once; either way, this process leaves
    the run, so that the next trial can start its own."""
    wait = status != RunStatus.to_string(RunStatus.KILLED)
    run_id = mlflow.active_run().info.run_id
    try:
        with STOPWATCH:
            confirm_epoch_metrics(wait)
            outage.persist(lambda: mlflow.set_tags(tags), wait)
            metrics = {
                "trial_seconds": time.perf_counter() - started,
                # Up to here: the last tag and these metrics are the only calls not counted.
                "tracking_seconds": STOPWATCH.seconds,
                "matrix_evaluation_seconds": STOPWATCH.evaluation_seconds,
            }
            outage.persist(lambda: mlflow.log_metrics(metrics), wait)
    except Exception as error:  # noqa: BLE001 -- only without `wait`: the interrupt goes on.
        log.warning(f"{what}'s MLflow run keeps part of its end: {config.redact(str(error))}")
    finally:
        try:
            mlflow.end_run(status)  # Leaves the run first, then tells the store.
        except Exception:  # noqa: BLE001
            with contextlib.suppress(Exception):
                outage.persist(lambda: mlflow.MlflowClient().set_terminated(run_id, status), wait)
        outage.WRITER[0] = "this command"


def end_stale_trial_run(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """Mark the run of a trial whose worker died as KILLED, not RUNNING, with `reason`."""
    run_id = trial.user_attrs.get(TRIAL_RUN_ATTR)
    if run_id is None:
        return
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "state", "FAIL")
    client.set_tag(run_id, "fail_reason", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def refit_run(parent_run_id: str, number: int) -> mlflow.ActiveRun:
    """The run of trial `number`'s configuration retrained on every training image."""
    tags = {"kind": "refit", "trial_number": trial_tag(number)}
    return child_run(parent_run_id, f"refit-trial-{trial_tag(number)}", tags)


def ensemble_run(parent_run_id: str, members: list[int]) -> mlflow.ActiveRun:
    """The run of an ensemble of the trials `members`."""
    tags = {"kind": "ensemble", "members": ",".join(map(str, members))}
    return child_run(parent_run_id, f"ensemble-{len(members)}", tags)


def select_run(parent_run_id: str, number: int) -> mlflow.ActiveRun:
    """The run of `digitune select` taking trial `number` for a device."""
    tags = {"kind": "select", "trial_number": trial_tag(number)}
    return child_run(parent_run_id, f"select-trial-{trial_tag(number)}", tags)


def imported_run(study_name: str, number: int, tags: dict, params: dict) -> mlflow.ActiveRun:
    """The run of a trial trained elsewhere and registered here (`digitune register
    --bundle`), in the study's experiment."""
    client = configure()
    run = mlflow.start_run(
        run_name=f"imported-trial-{trial_tag(number)}",
        experiment_id=experiment_id(client, study_name),
        tags={**tags, "trial_number": trial_tag(number)},
    )
    mlflow.log_params(params)
    return run


def _status_for(error: BaseException) -> str:
    if isinstance(error, optuna.TrialPruned):
        return RunStatus.to_string(RunStatus.FINISHED)
    if isinstance(error, KeyboardInterrupt):
        return RunStatus.to_string(RunStatus.KILLED)
    return RunStatus.to_string(RunStatus.FAILED)


def dataset(images: np.ndarray, labels: np.ndarray, name: str, source: str, digest: str):
    """An MLflow dataset input for the runs' Datasets column."""
    if not isinstance(images, np.ndarray):  # `data.Pictures`: MLflow needs only the shape.
        images = np.broadcast_to(np.zeros((), images.dtype), images.shape)
    with warnings.catch_warnings():
        # MLflow registers two equivalent sources for local paths and warns that it picked one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(
            images, targets=labels, source=source, name=name, digest=digest
        )


class EpochLogger(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback, logging each epoch's metrics (with the trainer's
    `epoch_seconds` and `compile_seconds`) at step = training images seen, and the objective
    so far (`best_val_accuracy`); the run's tags say which backend, device and precision
    trained it. Its `on_test_end` is silenced: Keras already hands the validation metrics to
    `on_epoch_end` as `val_loss` and `val_accuracy`, and logging them twice clutters the UI.
    """

    def __init__(self, epoch_images: int):
        super().__init__()
        self.epoch_images = epoch_images
        self.best = float("-inf")

    def on_train_begin(self, logs=None):
        with STOPWATCH:
            outage.persist(lambda: super(EpochLogger, self).on_train_begin(logs))
            described = backend.describe()
            tags = {
                # The precision the model really trains in, read off the model itself.
                "precision": self.model.dtype_policy.name,
                "backend": described["backend"],
                "device": described["devices"].split(", ")[0],
            }
            outage.persist(lambda: mlflow.set_tags(tags))

    def on_epoch_end(self, epoch, logs=None):
        metrics = dict(logs or {})
        if config.OBJECTIVE_METRIC in metrics:
            self.best = max(self.best, metrics[config.OBJECTIVE_METRIC])
            metrics[OBJECTIVE] = self.best
        step = (epoch + 1) * self.epoch_images
        run_id = mlflow.active_run().info.run_id
        with STOPWATCH:
            written = _EPOCH_WRITER.submit(
                mlflow.log_metrics, metrics, step=step, synchronous=True, run_id=run_id
            )
        _UNCONFIRMED.append((metrics, step, written))

    def on_test_end(self, logs=None):
        pass


# The epochs' metrics of this process's trial that were logged in the background and may not
# have been written yet: (metrics, step, the write's Future).
_UNCONFIRMED: list[tuple[dict, int, concurrent.futures.Future]] = []
# Writes epochs' metrics in the background, so that training never waits for the store (an
# outage included). Not MLflow's own asynchronous logging: ending a run stops its queue, which
# polls for work once a second, so every trial's end waited about a second for it.
_EPOCH_WRITER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="epoch-metrics")


def confirm_epoch_metrics(wait: bool = True) -> None:
    """Wait for the trial's epoch metrics logged in the background, and write again, at once,
    those that failed (the store was down)."""
    while _UNCONFIRMED:
        metrics, step, written = _UNCONFIRMED[0]
        try:
            written.result()
        except Exception:  # noqa: BLE001 -- lost on the way: write it again.
            outage.persist(functools.partial(mlflow.log_metrics, metrics, step=step), wait)
        _UNCONFIRMED.pop(0)
