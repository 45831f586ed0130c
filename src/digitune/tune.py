"""Run a study: trials until the budget is spent, then test and register the best model.

`n_trials` in a study file is the study's total: every finished trial (complete, pruned or
failed) counts, so running `tune` again after an interruption runs only the rest, and a
study that already has its trials only re-checks its best model. `timeout_minutes` limits
one invocation. The test set is touched once, after the study, for the best trial only.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from pathlib import Path

import keras
import mlflow
import optuna
import tqdm
from optuna.trial import TrialState

from digitune import (
    config,
    data,
    evaluate,
    model,
    objective,
    parallel,
    registry,
    report,
    space,
    tracking,
)
from digitune import refit as refit_module

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a finished `tune` reports."""

    study: optuna.Study
    seconds: float
    best_trial: optuna.trial.FrozenTrial
    test_accuracy: float
    model_version: str | None
    parent_run_id: str
    refit: refit_module.Refit | None = None


@dataclasses.dataclass(frozen=True)
class BestTrial:
    """The best trial of a study, whichever engine ran it: enough to rebuild its model."""

    study_name: str
    number: int
    params: dict
    run_id: str
    validation_accuracy: float
    engine: str = "optuna"

    @classmethod
    def of(cls, study: optuna.Study) -> BestTrial:
        best = study.best_trial
        return cls(
            study.study_name,
            best.number,
            space.params_of(best),
            best.user_attrs[tracking.TRIAL_RUN_ATTR],
            best.value,
        )


def make_sampler(settings: config.StudySettings, seed: int) -> optuna.samplers.BaseSampler:
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.n_startup_trials)


def make_pruner(definition: space.StudyDefinition) -> optuna.pruners.BasePruner:
    settings = definition.study
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=definition.training.max_epochs
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


def load_or_create_study(
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
                f"no study '{definition.study.name}' in {url} to join; start it with "
                "`make tune` on one machine first"
            ) from None
        study.pruner = make_pruner(definition)
    else:
        study = optuna.create_study(
            study_name=definition.study.name,
            storage=make_storage(url, definition.study),
            direction=definition.study.direction,
            pruner=make_pruner(definition),
            load_if_exists=True,
        )
    # A resumed study must not replay the sampler's first draws, and parallel workers must
    # not draw the same ones, so the seed moves on by the trials already run and the
    # worker's number; one uninterrupted worker is reproducible from the seed alone.
    if not join:
        # Optuna skips a configuration it has already run or queued, so a resumed study
        # does not repeat its warm start.
        for params in definition.enqueued:
            study.enqueue_trial(params, skip_if_exists=True)
    seed = definition.study.seed + 1000 * worker + len(study.trials)
    study.sampler = make_sampler(definition.study, seed)
    return study


def load_existing_study(study_file: str | Path, storage: str | None = None):
    """The study a study file names, as it is in `storage` (default: studies/<name>.db);
    an error that says how to create it when there is none. Returns (definition, study)."""
    definition = space.load(study_file)
    url = storage or config.default_storage(definition.study.name)
    try:
        study = optuna.load_study(study_name=definition.study.name, storage=url)
    except KeyError:
        raise ValueError(
            f"no study '{definition.study.name}' in {url}; run `make tune STUDY={study_file}` first"
        ) from None
    return definition, study


def run(
    study_file: str | Path | space.StudyDefinition,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
    workers: int = 1,
    join: bool = False,
    register: bool = True,
    experiment: str | None = None,
    refit: bool = False,
) -> Outcome | None:
    """Tune with `workers` processes, then evaluate the best trial's model on the test set
    and (with `register`) register it as `challenger`. With `join`, only run trials of a
    study started elsewhere (returns None). `experiment` defaults to the study's name."""
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Our own line per trial says it.
    if not isinstance(study_file, space.StudyDefinition):
        study_file = space.load(study_file)
    definition = with_overrides(study_file, n_trials, timeout_minutes)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    tracking.configure()  # Fail before loading data or training if the store is down.
    mnist = data.load()
    split = data.split(
        mnist, definition.training.train_images, definition.training.validation_images
    )
    study = load_or_create_study(definition, storage, join=join)
    print(
        f"study '{study.study_name}': {len(split.y_train):,} training and "
        f"{len(split.y_validation):,} validation images; "
        f"{_count(study, FINISHED_STATES)} of {definition.study.n_trials} trials done"
        + (f"; {workers} workers" if workers > 1 else "")
    )
    timeout = definition.study.timeout_minutes * 60 or None
    deadline = time.time() + timeout if timeout else None

    def run_trials(parent_run_id: str) -> None:
        if workers == 1:
            optimize(study, definition, split, parent_run_id, deadline, progress_bar=True)
        else:
            parallel.run_workers(definition, storage, workers, deadline)
        if objective.STOP.is_set():  # Ctrl-C: the trials stopped cleanly; so does the study.
            raise KeyboardInterrupt

    if join:
        # The machine that started the study owns its parent run and the registration.
        run_trials(study.user_attrs[tracking.PARENT_RUN_ATTR])
        return None
    parent_run_id = tracking.open_study_run(
        experiment or study.study_name,
        study.study_name,
        study.user_attrs.get(tracking.PARENT_RUN_ATTR),
        *run_inputs(definition, split, mnist),
        tags={"study": study.study_name, "engine": "optuna", "algorithm": _algorithm(definition)},
    )
    study.set_user_attr(tracking.PARENT_RUN_ATTR, parent_run_id)
    try:
        run_trials(parent_run_id)
        if _count(study, (TrialState.COMPLETE,)) == 0:
            raise RuntimeError(
                f"study '{study.study_name}' has no completed trial to register; "
                "see each trial's fail_reason above or in the MLflow UI"
            )
        with mlflow.start_run(run_id=parent_run_id):
            test_accuracy, version = finalize(BestTrial.of(study), mnist, register)
        refitted = (
            refit_module.run(study, definition, mnist, parent_run_id, test_accuracy)
            if refit
            else None
        )
        report.log_to_run(study, parent_run_id)
    except BaseException as error:
        tracking.close_study_run(parent_run_id, error)
        raise
    tracking.close_study_run(parent_run_id)
    return Outcome(
        study,
        time.perf_counter() - started,
        study.best_trial,
        test_accuracy,
        version,
        parent_run_id,
        refitted,
    )


def _algorithm(definition: space.StudyDefinition) -> str:
    return f"{definition.study.sampler}, {definition.study.pruner} pruner"


def with_overrides(
    definition: space.StudyDefinition, n_trials: int | None, timeout_minutes: float | None
) -> space.StudyDefinition:
    """The definition with the command line's budget in place of the file's."""
    overrides = {}
    if n_trials is not None:
        overrides["n_trials"] = n_trials
    if timeout_minutes is not None:
        overrides["timeout_minutes"] = timeout_minutes
    if not overrides:
        return definition
    return dataclasses.replace(definition, study=dataclasses.replace(definition.study, **overrides))


def optimize(
    study: optuna.Study,
    definition: space.StudyDefinition,
    split: data.Split,
    parent_run_id: str,
    deadline: float | None,
    progress_bar: bool = False,
    label: str = "",
) -> None:
    """Run trials in this process until the study has its trials or the deadline passes."""
    remaining = definition.study.n_trials - _count(study, FINISHED_STATES)
    timeout = deadline - time.time() if deadline else None
    if remaining <= 0 or (timeout is not None and timeout <= 0):
        return
    study.optimize(
        objective.make_objective(definition, split, parent_run_id, deadline),
        n_trials=remaining,
        timeout=timeout,
        # A failing trial (diverged, out of memory, ...) is recorded and the study goes on.
        catch=(Exception,),
        callbacks=[
            # Counts every worker's trials, running ones too, so that all workers stop at the
            # study's total. (Two workers finishing at the same instant may still both start
            # one more: at most one trial too many per extra worker.)
            optuna.study.MaxTrialsCallback(
                definition.study.n_trials, states=(*FINISHED_STATES, TrialState.RUNNING)
            ),
            functools.partial(_print_trial, label=label),
        ],
        show_progress_bar=progress_bar,
    )


def finalize(best: BestTrial, mnist: data.Mnist, register: bool = True) -> tuple[float, str | None]:
    """Rebuild the best trial's model from its params and weights, evaluate it on the test
    set into the active (parent) run, and (with `register`) register it unless that trial
    already is. Returns the test accuracy and the registered version."""
    cnn = rebuild(best.params, best.run_id)
    test = evaluate.evaluate(cnn, data.preprocess(mnist.test_images), mnist.test_labels)
    tracking.log_evaluation(test, "test", f"best trial {best.number}, MNIST test set")
    mlflow.log_metrics(
        {"test_accuracy": test.accuracy, "best_val_accuracy": best.validation_accuracy}
    )
    mlflow.set_tags({"best_trial": str(best.number)})
    if not register:
        return test.accuracy, None

    existing = registry.find_version(best.study_name, best.number)
    if existing is not None:
        print(f"best trial {best.number} is already registered as version {existing.version}")
        return test.accuracy, str(existing.version)
    version = registry.register(
        cnn,
        study_name=best.study_name,
        trial_number=best.number,
        params=best.params,
        validation_accuracy=best.validation_accuracy,
        test_accuracy=test.accuracy,
        test_images=len(mnist.test_labels),
        data_sha256=mnist.digest,
        engine=best.engine,
    )
    return test.accuracy, str(version.version)


def rebuild(params: dict, trial_run_id: str) -> keras.Model:
    """A trial's model, in float32, from its params and the weights its run logged."""
    with tempfile.TemporaryDirectory() as scratch:
        # The registered model computes in float32 whatever precision the trials trained in:
        # it must run anywhere, and it is what the test accuracy is measured on.
        keras.mixed_precision.set_global_policy("float32")
        cnn = model.build_model(params)
        # The weights file holds the optimizer's state too; building the optimizer first lets
        # it load whole instead of warning that half the file was skipped.
        cnn.optimizer.build(cnn.trainable_variables)
        cnn.load_weights(tracking.download_weights(trial_run_id, Path(scratch)))
    return cnn


def run_inputs(definition: space.StudyDefinition, split: data.Split, mnist: data.Mnist):
    """The parent run's resolved configuration and MLflow datasets (only the machine that
    owns the parent run builds them)."""
    datasets = {
        "training": tracking.dataset(
            split.x_train, split.y_train, "mnist-train", str(mnist.source), mnist.digest[:16]
        ),
        "validation": tracking.dataset(
            split.x_validation,
            split.y_validation,
            "mnist-validation",
            str(mnist.source),
            mnist.digest[:16],
        ),
    }
    resolved = {
        **definition.resolved(),
        "data_sha256": mnist.digest,
        "data_canonical": mnist.canonical,
    }
    return resolved, datasets


def _count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, label: str = "") -> None:
    """One line per finished trial, written above the progress bar."""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    detail = trial.user_attrs.get("fail_reason", "")
    if trial.state == TrialState.PRUNED:
        detail = f"pruned after {len(trial.intermediate_values)} epoch(s)"
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    tqdm.tqdm.write(
        f"{label}trial {trial.number:3d} {trial.state.name:8s} value={value} {seconds:6.1f}s "
        f"{params} {detail}".rstrip()
    )


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
