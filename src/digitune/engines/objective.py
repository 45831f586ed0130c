"""The Optuna trial function: build a CNN from the trial's params, train it with pruning,
track it, return its best validation accuracy (and, in a study with [objectives], its costs).

Kept thin on purpose: a fresh Keras session, the trial as plain params (`space.suggest`),
`model.build_model`, `trainer.fit` with the pruning, early-stopping and tracking callbacks.
The data is loaded once, outside the trial.
"""

from __future__ import annotations

import numpy as np
import optuna
from optuna_integration.keras import KerasPruningCallback

from digitune import (
    artifacts,
    config,
    data,
    deployment,
    model,
    pareto,
    space,
    study,
    study_file,
    tracking,
    trainer,
)


def make_objective(
    definition: study_file.StudyDefinition,
    split: data.Split,
    parent_run_id: str,
    deadline: float | None = None,
):
    """The function `study.optimize` calls once per trial. Trials log as children of
    `parent_run_id`; `deadline` is when the study's time is up (a `time.time()` value, the
    same in every worker process), or None."""
    training, settings = definition.training, definition.objectives
    calibration = np.asarray(split.x_train[: deployment.CALIBRATION_IMAGES])
    epoch_images = trainer.images_per_epoch(training, split)

    def objective(trial: optuna.Trial) -> float | list[float]:
        if trainer.STOP.is_set():
            raise KeyboardInterrupt
        # One seed per trial: a trial's initial weights and batch order can be reproduced.
        trainer.fresh_session(training.precision, definition.study.seed + trial.number)
        params = space.suggest(trial, definition)
        # Which machine and process ran it: workers and machines share a study.
        trial.set_user_attr(study.WORKER_ATTR, study.worker_id())
        trial.set_user_attr(study.PROCESS_ATTR, study.this_process())
        trial.set_user_attr(study.EPOCH_IMAGES_ATTR, epoch_images)
        with tracking.trial_run(
            trial.number, params, parent_run_id, "optuna", remember=trial.set_user_attr
        ):
            cnn = model.build_model(params)
            size = cnn.count_params()
            if settings.max_params and size > settings.max_params:  # known before training
                reason = f"{size:,} parameters, over max_params {settings.max_params:,.0f}"
                trial.set_constraint("max_params", size - settings.max_params)
                trial.set_user_attr("fail_reason", reason)
                raise optuna.TrialPruned(reason)
            callbacks = trainer.training_callbacks(training, deadline, epoch_images)
            if not settings.minimize:  # Optuna prunes single-objective trials only
                # After the epoch is logged, before the deadline and early stopping.
                logged = next(
                    index
                    for index, callback in enumerate(callbacks)
                    if isinstance(callback, tracking.EpochLogger)
                )
                callbacks.insert(logged + 1, KerasPruningCallback(trial, config.OBJECTIVE_METRIC))
            history = trainer.fit(
                cnn,
                params,
                split,
                training.max_epochs,
                callbacks,
                settings=training,
            ).history
            trial.set_user_attr("epochs", len(history["loss"]))
            if any(isinstance(c, trainer.StopAtDeadline) and c.stopped for c in callbacks):
                trial.set_user_attr(study.DEADLINE_ATTR, True)  # its line says so
            # Early stopping restored the best epoch's weights, so the matrix matches the value.
            validation = artifacts.evaluate_validation(cnn, split)
            trainer.check_learned(history, params, validation.confusion_matrix)
            artifacts.log_trial_result(cnn, validation, trial.number)
            accuracy = max(history[config.OBJECTIVE_METRIC])
            if not settings.measured:
                return accuracy
            deployed = deployment.float32_copy(cnn, params)  # as it would be registered
            measured = artifacts.log_costs(deployment.measure(deployed, calibration), accuracy)
            trial.set_user_attr(pareto.COSTS_ATTR, measured)
            for name, over in pareto.violations(measured, settings).items():
                trial.set_constraint(name, over)
            return pareto.values(accuracy, measured, settings)

    return objective
