"""The Optuna engine: run a study's trials until its budget is spent, then test and register
the best model.

    digitune tune --study studies/mnist-cnn.toml [--trials N] [--timeout-minutes M]
                  [--workers N] [--storage URL] [--join] [--refit]

`n_trials` in a study file is the study's total: every finished trial (complete, pruned or
failed) counts, so running `tune` again after an interruption runs only the rest, and a
study that already has its trials only re-checks its best model. `timeout_minutes` limits
one invocation. The test set is touched once, after the study, for the best trial only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from digitune import objectives, report, space, study, tracking, trainer
from digitune import refit as refitting
from digitune.engines import objective, scaffold
from digitune.engines import workers as processes

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a finished `tune` reports."""

    study: optuna.Study
    seconds: float
    best_trial: optuna.trial.FrozenTrial
    test_accuracy: float
    model_version: str | None
    parent_run_id: str
    refit: refitting.Refit | None = None
    # Worker processes that died (killed, crashed) while the study ran, in words; their
    # trials were failed and run again by the others.
    worker_deaths: tuple[str, ...] = ()
    model_name: str = ""


class WorkerError(RuntimeError):
    """A worker process died while this machine's workers ran trials."""


def run(
    study_file: str | Path | space.StudyDefinition,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
    workers: int | None = None,
    join: bool = False,
    register: bool = True,
    experiment: str | None = None,
    refit: bool = False,
) -> Outcome | None:
    """Tune with `workers` processes (default: the study file's), then evaluate the best
    trial's model on the test set and (with `register`) register it as `challenger`. With
    `join`, only run trials of a study started elsewhere (returns None). `experiment`
    defaults to the study's name."""
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Our own line per trial says it.
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    inputs = scaffold.prepare(study_file, n_trials, timeout_minutes)
    definition = inputs.definition
    workers = workers or definition.study.workers
    optuna_study = study.load_or_create(definition, storage, join=join)
    # Trials left RUNNING by this machine's workers of an earlier run that was killed: failed
    # and queued again now, not once the heartbeat grace period is over.
    study.fail_trials_of_dead_workers(optuna_study, definition.study)
    log.info(
        "study '%s': %s training and %s validation images; %d of %d trials done%s",
        optuna_study.study_name,
        f"{len(inputs.split.y_train):,}",
        f"{len(inputs.split.y_validation):,}",
        study.count(optuna_study),
        definition.study.n_trials,
        f"; {workers} workers" if workers > 1 else "",
    )

    def run_trials(parent_run_id: str) -> tuple[str, ...]:
        deaths: list[str] = []
        if workers == 1:
            study.optimize(
                optuna_study,
                definition,
                objective.make_objective(definition, inputs.split, parent_run_id, inputs.deadline),
                inputs.deadline,
                progress_bar=True,
            )
        else:
            deaths = processes.run_workers(
                definition, storage, workers, inputs.deadline, optuna_study
            )
        # Ctrl-C or SIGTERM: the trials stopped cleanly; so does the study.
        if trainer.STOP.is_set():
            raise KeyboardInterrupt
        # Runs of trials whose worker died while MLflow could not be reached.
        study.close_runs_of_failed_trials(optuna_study)
        return tuple(deaths)

    if join:
        # The machine that started the study owns its parent run and the registration.
        deaths = run_trials(study.parent_run_id(optuna_study))
        if deaths:
            raise WorkerError("; ".join(deaths) + "; the other workers' trials are kept")
        return None
    settings = definition.study
    with scaffold.parent_run(
        inputs,
        experiment=experiment or optuna_study.study_name,
        run_name=optuna_study.study_name,
        run_id=optuna_study.user_attrs.get(tracking.PARENT_RUN_ATTR),
        tags={
            "study": optuna_study.study_name,
            "engine": "optuna",
            "algorithm": f"{settings.sampler}, {settings.pruner} pruner",
        },
    ) as parent_run_id:
        optuna_study.set_user_attr(tracking.PARENT_RUN_ATTR, parent_run_id)
        deaths = run_trials(parent_run_id)
        if study.count(optuna_study, (TrialState.COMPLETE,)) == 0:
            raise RuntimeError(
                f"study '{optuna_study.study_name}' has no completed trial to register; "
                "see each trial's fail_reason above or in the MLflow UI"
            )
        best = scaffold.BestTrial.of(optuna_study)
        test_accuracy, version = scaffold.finalize(best, inputs, parent_run_id, register)
        refitted = (
            refitting.run(optuna_study, definition, inputs.dataset, parent_run_id, test_accuracy)
            if refit
            else None
        )
        report.log_to_run(optuna_study, parent_run_id, settings=definition.objectives)
    return Outcome(
        optuna_study,
        time.perf_counter() - started,
        objectives.best_trial(optuna_study),
        test_accuracy,
        version,
        parent_run_id,
        refitted,
        deaths,
        definition.model_name,
    )
