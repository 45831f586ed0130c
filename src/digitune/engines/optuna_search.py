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

import logging
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from digitune import refit, registry, report, study, study_file, tracking, trainer
from digitune.engines import objective, parallel, scaffold

log = logging.getLogger(__name__)

ENGINE = "optuna"


class WorkerError(RuntimeError):
    """A worker process died while this machine's workers ran trials."""


def run(
    source: str | Path | study_file.StudyDefinition,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
    workers: int | None = None,
    join: bool = False,
    register: bool = True,
    experiment: str | None = None,
    refit_best: bool = False,
    progress_bar: bool = True,
) -> scaffold.Outcome | None:
    """Tune with `workers` processes (default: the study file's), then evaluate the best
    trial's model on the test set and (with `register`) register it as `challenger`.

    Any number of such runs, on any machines sharing `storage` and the tracking store, work
    on one study: the first creates it and its parent run, the others join, and the last to
    finish tests and registers its best (the others return None). With `join`, only run
    trials of a study started elsewhere (returns None). `experiment` defaults to the study's
    name."""
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # Our own line per trial says it.
    if workers is not None:
        study_file.check_workers(workers, "--workers")
    inputs = scaffold.prepare(source, n_trials, timeout_minutes)
    definition = inputs.definition
    workers = workers or definition.study.workers
    optuna_study = study.load_or_create(
        definition, storage, join, study.fingerprint(definition, inputs.dataset.digest)
    )
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
                progress_bar=progress_bar,
                stop=trainer.STOP,
            )
        else:
            deaths = parallel.run_workers(
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
        run_name=tracking.parent_run_name(optuna_study.study_name, ENGINE, ""),
        run_id=optuna_study.user_attrs.get(tracking.PARENT_RUN_ATTR),
        tags={
            "study": optuna_study.study_name,
            "engine": ENGINE,
            "algorithm": f"{settings.sampler}, {settings.pruner} pruner",
        },
        # Of workers that start the study together, on any machines, one run is kept.
        claim=lambda new, old: study.claim(optuna_study, tracking.PARENT_RUN_ATTR, new, old),
        others_running=lambda: study.others_running(optuna_study),
    ) as parent_run_id:
        deaths = run_trials(parent_run_id)
        if study.others_running(optuna_study):
            # Out of time while other workers still run trials: the last to finish tests
            # and registers the study's best.
            log.info(
                "other workers still run trials of study '%s'; the last to finish tests and "
                "registers its best",
                optuna_study.study_name,
            )
            return None
        if study.count(optuna_study, (TrialState.COMPLETE,)) == 0:
            raise RuntimeError(
                f"study '{optuna_study.study_name}' has no completed trial to register; "
                "see each trial's fail_reason above or in the MLflow UI"
            )
        best = registry.BestTrial.of(optuna_study)
        test_accuracy, version = registry.register_best(
            best, definition, inputs.dataset, parent_run_id, register, storage=storage
        )
        refitted = (
            refit.run(optuna_study, definition, inputs.dataset, parent_run_id, test_accuracy)
            if refit_best
            else None
        )
        report.log_to_run(optuna_study, parent_run_id, settings=definition.objectives)
    return scaffold.Outcome(
        optuna_study.study_name,
        ENGINE,
        time.perf_counter() - started,
        states(optuna_study),
        best,
        test_accuracy,
        version,
        definition.model_name,
        parent_run_id,
        study=optuna_study,
        refit=refitted,
        worker_deaths=deaths,
    )


def states(optuna_study: optuna.Study) -> dict[str, int]:
    """The study's trials by how they ended, a trial the deadline cut short apart."""
    counted: dict[str, int] = {}
    for trial in optuna_study.trials:
        state = trial.state.name.lower()
        if trial.user_attrs.get(study.DEADLINE_ATTR):
            state += " but cut short by the deadline"
        counted[state] = counted.get(state, 0) + 1
    return dict(sorted(counted.items()))
