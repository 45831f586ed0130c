"""The Optuna study: its storage, sampler and pruner, creating or loading it, running trials.

A study file's [study] table decides the sampler (TPE or random), the pruner (median,
Hyperband or none) and the storage's heartbeats; the storage is `studies/<name>.db`
(SQLite) unless a URL says otherwise (PostgreSQL for several machines). `n_trials` is the
study's total: every finished trial counts, so `optimize` on a resumed study runs only the
rest. Every study maximises `val_accuracy`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from digitune import config, space, tracking

log = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def make_sampler(settings: config.StudySettings, seed: int) -> optuna.samplers.BaseSampler:
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # The constant liar makes parallel workers sample away from the trials still running.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=settings.n_startup_trials, constant_liar=True
    )


def make_pruner(definition: space.StudyDefinition) -> optuna.pruners.BasePruner:
    settings = definition.study
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=definition.training.max_epochs
        )
    if settings.pruner == "successive_halving":
        # Steps are epoch indices: rung 0 is judged after epoch min_resource + 1.
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=max(1, settings.pruner_warmup_epochs), reduction_factor=3
        )
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=settings.pruner_startup_trials,
        n_warmup_steps=settings.pruner_warmup_epochs,
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
        # Heartbeats have been "experimental" since Optuna 2.8; the warnings say nothing a
        # user can act on.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retries)

        def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            tracking.end_stale_trial_run(trial)
            retry(study, trial)

        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=settings.heartbeat_seconds,
            grace_period=settings.heartbeat_grace_seconds,
            heartbeat_stale_trial_callback=on_stale_trial,
        )


def load_or_create(
    definition: space.StudyDefinition, storage: str | None, worker: int = 0, join: bool = False
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
        study.pruner = make_pruner(definition)
    else:
        study = optuna.create_study(
            study_name=definition.study.name,
            storage=make_storage(url, definition.study),
            direction="maximize",
            pruner=make_pruner(definition),
            load_if_exists=True,
        )
        with warnings.catch_warnings():
            # Experimental in Optuna 5, and harmless: it names the value in Optuna's plots
            # and in optuna-dashboard.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([config.OBJECTIVE_METRIC])
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


def load_existing(study_file: str | Path, storage: str | None = None):
    """The study a study file names, as it is in `storage` (default: studies/<name>.db);
    an error that says how to create it when there is none. Returns (definition, study)."""
    definition = space.load(study_file)
    url = storage or config.default_storage(definition.study.name)
    try:
        study = optuna.load_study(study_name=definition.study.name, storage=url)
    except KeyError:
        raise ValueError(
            f"no study '{definition.study.name}' in {config.redact(url)}; "
            f"run `make tune STUDY={study_file}` first"
        ) from None
    return definition, study


def optimize(
    study: optuna.Study,
    definition: space.StudyDefinition,
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


def count(study: optuna.Study, states=FINISHED_STATES) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def trial_line(trial: optuna.trial.FrozenTrial, label: str = "") -> str:
    """The one line a finished trial prints."""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    detail = trial.user_attrs.get("fail_reason", "")
    if trial.state == TrialState.PRUNED:
        detail = f"pruned after {len(trial.intermediate_values)} epoch(s)"
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return (
        f"{label}trial {trial.number:3d} {trial.state.name:8s} value={value} {seconds:6.1f}s "
        f"{params} {detail}"
    ).rstrip()


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
