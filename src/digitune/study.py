"""The Optuna study: its storage, sampler and pruner, creating or loading it, running trials.

[study] decides sampler, pruner, heartbeats; the storage is `studies/<name>.db` unless a URL
says otherwise. A resumed study runs the rest of `n_trials`; every study maximises
`val_accuracy` (and minimises its [objectives] costs).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from digitune import config, pareto, pruners, space, study_file, tracking

log = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# User attributes: which machine and process ran a trial ("<host>:<pid>"); images per epoch;
# whether the study's deadline ended its training.
WORKER_ATTR, EPOCH_IMAGES_ATTR, DEADLINE_ATTR = "worker", "epoch_images", "stopped_at_deadline"


def worker_id() -> str:
    """This machine and process, as WORKER_ATTR says it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_sampler(settings: config.StudySettings, seed: int) -> optuna.samplers.BaseSampler:
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "nsga2":
        # Constraints recorded with `Trial.set_constraint` steer its selection too.
        return optuna.samplers.NSGAIISampler(seed=seed)
    # The constant liar makes parallel workers sample away from the trials still running.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=settings.n_startup_trials, constant_liar=True
    )


def make_storage(url: str, settings: config.StudySettings) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage for `url`, with heartbeats so that a killed worker's trial is
    failed and retried, and SQLite told to wait for a busy database instead of failing."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        # Heartbeats are "experimental" since Optuna 2.8: nothing a user can act on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _retry_callback(settings)

        def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            retry(study, trial)  # First: the retry must not wait for MLflow.
            _close_run_of(trial, "its worker stopped sending heartbeats (killed?)")

        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=settings.heartbeat_seconds,
            grace_period=settings.heartbeat_grace_seconds,
            heartbeat_stale_trial_callback=on_stale_trial,
        )


def _retry_callback(settings: config.StudySettings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retries)


def _close_run_of(trial: optuna.trial.FrozenTrial, reason: str) -> None:
    """End a dead trial's MLflow run KILLED; if MLflow cannot be reached now, the run is closed
    when the study ends (`close_runs_of_failed_trials`)."""
    try:
        tracking.end_stale_trial_run(trial, reason)
    except Exception as error:  # noqa: BLE001 -- MLflow down must not stop the retry.
        reason = config.redact(str(error))
        log.warning(f"trial {trial.number}'s MLflow run stays open until the study ends: {reason}")


def fail_trials_of_dead_workers(
    optuna_study: optuna.Study, settings: config.StudySettings, pids: list[int] | None = None
) -> list[int]:
    """Fail and retry the RUNNING trials of worker processes on this machine that are gone
    (killed or crashed): at once, rather than after the heartbeat grace period. `pids`: only
    those processes' trials (known dead); otherwise every local worker not alive. Returns
    the failed trials' numbers."""
    host = socket.gethostname()
    retry = _retry_callback(settings)
    failed = []
    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get(WORKER_ATTR, "")).rpartition(":")
        if worker_host != host or not pid.isdigit():
            continue
        if (int(pid) not in pids) if pids is not None else _alive(int(pid)):
            continue
        try:
            optuna_study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # Finished meanwhile (by a heartbeat check elsewhere).
        frozen = optuna_study.get_trials(deepcopy=False)[trial.number]
        retry(optuna_study, frozen)
        _close_run_of(frozen, f"its worker process {pid} on {host} died (killed or crashed)")
        died = f"its worker process {pid} died"
        log.warning(f"trial {trial.number}: {died}; failed, and queued to run again")
        failed.append(trial.number)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process.
    return True


def close_runs_of_failed_trials(optuna_study: optuna.Study) -> None:
    """End the MLflow runs of failed trials that are still RUNNING (their worker died while
    MLflow could not be reached)."""
    import mlflow

    client = mlflow.MlflowClient()
    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(tracking.TRIAL_RUN_ATTR)
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            tracking.end_stale_trial_run(trial, "its worker died; closed when the study ended")


def load_or_create(
    definition: study_file.StudyDefinition, storage: str | None, worker: int = 0, join: bool = False
) -> optuna.Study:
    """The study named in the file, created in `storage` or resumed from it; with `join`,
    it must exist already (another machine started it)."""
    url = storage or config.default_storage(definition.study.name)
    if join:
        try:
            study = optuna.load_study(
                study_name=definition.study.name, storage=make_storage(url, definition.study)
            )
        except KeyError:
            raise ValueError(
                f"no study '{definition.study.name}' in {config.redact(url)} to join; start it "
                "with `make tune` on one machine first"
            ) from None
        study.pruner = pruners.make_pruner(definition.study, definition.training.max_epochs)
    else:
        study = optuna.create_study(
            study_name=definition.study.name,
            storage=make_storage(url, definition.study),
            directions=pareto.directions(definition.objectives),
            pruner=pruners.make_pruner(definition.study, definition.training.max_epochs),
            load_if_exists=True,
        )
        with warnings.catch_warnings():
            # Experimental in Optuna 5, and harmless: it names the value in Optuna's plots
            # and in optuna-dashboard.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(pareto.metric_names(definition.objectives))
        # Optuna skips a configuration it has already run or queued, so a resumed study
        # does not repeat its warm start.
        for params in definition.enqueued:
            study.enqueue_trial(params, skip_if_exists=True)
    # A resumed study must not replay the sampler's first draws, and parallel workers must
    # not draw the same ones, so the seed moves on by the trials already run and the
    # worker's number; one uninterrupted worker is reproducible from the seed alone.
    seed = definition.study.seed + 1000 * worker + len(study.trials)
    study.sampler = make_sampler(definition.study, seed)
    return study


# How long a joining worker waits for the starting machine to open the MLflow parent run.
PARENT_RUN_WAIT_SECONDS = 30.0


def parent_run_id(optuna_study: optuna.Study) -> str:
    """The MLflow parent run of a study started elsewhere, waiting a little for it."""
    deadline = time.monotonic() + PARENT_RUN_WAIT_SECONDS
    while True:
        run_id = optuna_study.user_attrs.get(tracking.PARENT_RUN_ATTR)
        if run_id is not None:
            return run_id
        if time.monotonic() > deadline:
            raise ValueError(
                f"study '{optuna_study.study_name}' has no MLflow parent run after "
                f"{PARENT_RUN_WAIT_SECONDS:.0f} s: the `make tune` that created it has not "
                "started tracking (is it still loading, or did it fail?). Join once it prints "
                "its first trial"
            )
        time.sleep(1.0)


def load_existing(source: str | Path, storage: str | None = None):
    """The study a study file names, as it is in `storage` (default: studies/<name>.db);
    an error that says how to create it when there is none. Returns (definition, study)."""
    definition = study_file.load(source)
    url = storage or config.default_storage(definition.study.name)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        # Optuna would make an empty database there (and fail where studies/ is missing).
        raise ValueError(
            f"no study '{definition.study.name}': {url.removeprefix('sqlite:///')} does not "
            f"exist; run `make tune STUDY={source}` first, in the project folder"
        )
    try:
        study = optuna.load_study(study_name=definition.study.name, storage=url)
    except KeyError:
        raise ValueError(
            f"no study '{definition.study.name}' in {config.redact(url)}; "
            f"run `make tune STUDY={source}` first"
        ) from None
    return definition, study


def optimize(
    study: optuna.Study,
    definition: study_file.StudyDefinition,
    objective: Callable[[optuna.Trial], float],
    deadline: float | None,
    progress_bar: bool = False,
    label: str = "",
) -> None:
    """Run trials in this process until the study has its trials or the deadline passes."""
    remaining = definition.study.n_trials - count(study, FINISHED_STATES)
    timeout = deadline - time.time() if deadline else None
    if remaining <= 0 or (timeout is not None and timeout <= 0):
        return
    study.optimize(
        objective,
        n_trials=remaining,
        # Whole seconds: Optuna's progress bar prints the timeout as given.
        timeout=max(1, round(timeout)) if timeout is not None else None,
        # A failing trial (diverged, out of memory, ...) is recorded and the study goes on.
        catch=(Exception,),
        callbacks=[
            # Counts every worker's trials, running ones too, so that all workers stop at the
            # study's total. (Two workers finishing at the same instant may still both start
            # one more: at most one trial too many per extra worker.)
            optuna.study.MaxTrialsCallback(
                definition.study.n_trials, states=(*FINISHED_STATES, TrialState.RUNNING)
            ),
            lambda study, trial: log.info(trial_line(trial, label)),
        ],
        show_progress_bar=progress_bar,
    )


def count(study: optuna.Study, states=FINISHED_STATES) -> int:  # finished trials by default
    return len(study.get_trials(deepcopy=False, states=states))


def trial_line(trial: optuna.trial.FrozenTrial, label: str = "") -> str:
    """The one line a finished trial prints."""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    accuracy = pareto.accuracy(trial)
    value = (f"{accuracy:.4f}" if accuracy is not None else "-") + pareto.costs_text(trial)
    detail, images = (
        trial.user_attrs.get("fail_reason", ""),
        trial.user_attrs.get(EPOCH_IMAGES_ATTR),
    )
    size = f" of {images:,} images" if images else ""
    epochs = f"{len(trial.intermediate_values)} epoch(s){size}"
    if trial.state == TrialState.PRUNED and (trial.intermediate_values or not detail):
        detail = f"pruned after {epochs}"
    elif trial.state == TrialState.PRUNED:
        detail = f"not trained: {detail}"
    elif trial.user_attrs.get(DEADLINE_ATTR):
        detail = f"cut short by the study's deadline after {epochs}"
    params = " ".join(f"{k}={space.readable(v)}" for k, v in trial.params.items())
    return (
        f"{label}trial {trial.number:3d} {trial.state.name:8s} value={value} {seconds:6.1f}s "
        f"{params} {detail}"
    ).rstrip()
