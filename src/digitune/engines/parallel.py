"""Run one study's trials in several worker processes that share its storage.

`digitune tune --workers N` starts N processes; each loads the data, joins the study through
its storage (SQLite by default, PostgreSQL for several machines) and runs trials until the
study has its total, logging them as children of the study's one MLflow parent run. Each
worker gets an equal share of the CPU threads, or a GPU: each its own, or in turn when there are
more workers than GPUs (a small network leaves a GPU idle between steps; several fill it).
The launching process registers the best model once, after every worker has stopped.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys

import optuna

from digitune import backend, config, data, study, study_file, tracking, trainer
from digitune.engines import objective

log = logging.getLogger(__name__)


def thread_share(workers: int) -> int:
    """CPU threads for each of `workers` processes on this machine."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_workers(
    definition: study_file.StudyDefinition,
    storage: str | None,
    workers: int,
    deadline: float | None,
    optuna_study,
) -> list[str]:
    """Run `workers` processes on the study and wait for all of them. A worker that dies
    (killed, crashed) has its running trial failed and queued again at once, for the others
    to take; returns what happened to each such worker, in words."""
    # Spawned, not forked: TensorFlow's runtime does not survive a fork.
    context = multiprocessing.get_context("spawn")
    log_level = logging.getLogger("digitune").getEffectiveLevel()
    gpus = len([device for device in backend.devices() if device.kind == "gpu"])
    processes = []
    for index in range(workers):
        # Through `backend.spawned`, so that the worker takes its GPU or its share of the
        # threads, then loads the backend without its start-up lines, as the command does.
        target, args = backend.spawn_call(
            work,
            definition,
            storage,
            index,
            workers,
            deadline,
            log_level,
            environment=backend.worker_setup(index, workers, gpus, thread_share(workers)),
        )
        processes.append(
            context.Process(target=target, args=args, name=f"worker {index + 1} of {workers}")
        )
    for process in processes:
        process.start()
    # Ctrl-C reaches the workers too (the terminal signals the whole process group): they
    # stop at their next batch and record their trials, and the launcher's handler only
    # notes it (trainer.stop_cleanly_on_ctrl_c). SIGTERM reaches the launcher alone, so it
    # passes it on.
    deaths: dict[str, str] = {}
    passed_on = False
    while any(process.is_alive() for process in processes):
        multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], 0.5)
        if trainer.STOP_SIGNAL == signal.SIGTERM and not passed_on:
            for process in processes:
                if process.is_alive():
                    process.terminate()
            passed_on = True
        for process in processes:
            stopped = trainer.STOP.is_set() and process.exitcode in (
                -signal.SIGINT,
                -signal.SIGTERM,
            )
            if process.exitcode not in (0, None) and not stopped and process.name not in deaths:
                deaths[process.name] = _death(process)
                log.warning("%s", deaths[process.name])
                study.fail_trials_of_dead_workers(
                    optuna_study, definition.study, pids=[process.pid]
                )
    return list(deaths.values())


def _death(process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    how = (
        f"was killed by {signal.Signals(-code).name}"
        if code < 0
        else f"stopped with exit status {code} (its error is above)"
    )
    return f"{process.name} (process {process.pid}) {how}"


def work(
    definition: study_file.StudyDefinition,
    storage: str | None,
    index: int,
    workers: int,
    deadline: float | None,
    log_level: int = logging.INFO,
) -> None:
    """One worker process: join the study and run trials until it has its total."""
    # A spawned process starts without the launcher's logging: its trial lines go to stdout,
    # redacted as the launcher's are.
    config.redact_every_log_record()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("digitune").addHandler(handler)
    logging.getLogger("digitune").setLevel(log_level)
    # Not the root logger's too: a library that configures it (absl does, once the TFLite
    # converter has logged) would print every line twice.
    logging.getLogger("digitune").propagate = False
    trainer.stop_cleanly_on_ctrl_c()  # The terminal's Ctrl-C reaches every worker.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracking.configure(create=True)
    split = data.split(
        data.load(definition.data),
        definition.training.train_images,
        definition.training.validation_images,
    )
    optuna_study = study.load_or_create(definition, storage, join=True)
    parent_run_id = study.parent_run_id(optuna_study)
    label = f"[worker {index + 1}/{workers}] "
    try:
        study.optimize(
            optuna_study,
            definition,
            objective.make_objective(definition, split, parent_run_id, deadline),
            deadline,
            label=label,
            stop=trainer.STOP,
        )
    except KeyboardInterrupt:
        pass  # The trial was recorded as failed; the launcher reports the interruption.
