"""The Optuna study: its storage, sampler and pruner, creating or loading it, running trials.

[study] decides sampler, pruner, heartbeats; the storage is `studies/<name>.db` unless a URL
says otherwise. A resumed study runs the rest of `n_trials`; every study maximises
`val_accuracy` (and minimises its [objectives] costs).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages._rdb import models as rdb_models
from optuna.trial import TrialState

from digitune import __version__, builder, config, pareto, pruners, space, study_file, tracking

log = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# User attributes: which worker ran a trial ("<host>:<pid>:<token>", unique to the process),
# and the process as this machine's kernel knows it (`this_process`); images per epoch;
# whether the study's deadline ended its training.
WORKER_ATTR, PROCESS_ATTR = "worker", "worker_process"
EPOCH_IMAGES_ATTR, DEADLINE_ATTR = "epoch_images", "stopped_at_deadline"
# A study's user attribute: what its trials depend on (`fingerprint`), set by the first worker.
FINGERPRINT_ATTR = "fingerprint"


def worker_id() -> str:
    """This process among every worker of every machine, as WORKER_ATTR says it: the host and
    pid for people, and a token of its own, since containers share host names and reuse pids."""
    if _IDENTITY.get("pid") != os.getpid():  # A forked child is a worker of its own.
        _IDENTITY.update(pid=os.getpid(), token=uuid.uuid4().hex[:12])
    return f"{socket.gethostname()}:{os.getpid()}:{_IDENTITY['token']}"


_IDENTITY: dict = {}


def this_process(pid: int | None = None) -> dict | None:
    """A process as this machine's kernel tells it from every other, ever: the boot, the pid
    namespace (each container has its own), the pid and the process's start time (a pid
    reused later starts at another time). None where /proc cannot tell (not Linux)."""
    pid = pid or os.getpid()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        # Field 22 of stat, counted after the command name, which may hold spaces.
        started = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None
    return {"boot": boot, "pid_namespace": namespace, "pid": pid, "started": started}


def _gone(process: dict | None) -> bool:
    """Whether a worker's process (`this_process` where it ran) is known to have ended: it ran
    on this boot of this machine, in this pid namespace, and no process with its pid and start
    time is left. A worker elsewhere (another machine, another container) is never known gone
    here: its heartbeats tell."""
    here = this_process()
    if not process or here is None:
        return False
    if (process.get("boot"), process.get("pid_namespace")) != (here["boot"], here["pid_namespace"]):
        return False
    return this_process(int(process["pid"])) != process


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
            retry(study, _as_retried(trial))  # First: the retry must not wait for MLflow.
            _close_run_of(trial, "its worker stopped sending heartbeats (killed?)")

        for attempt in range(TABLE_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=settings.heartbeat_seconds,
                    grace_period=settings.heartbeat_grace_seconds,
                    heartbeat_stale_trial_callback=on_stale_trial,
                )
            except sqlalchemy.exc.DBAPIError as error:
                # Optuna creates its tables and stamps their version in a new database by
                # looking, then writing: workers starting together collide (PostgreSQL: the
                # table "already exists"; SQLite or either: a UNIQUE constraint on the version
                # row), and once the other has written, looking again finds it.
                collided = isinstance(error, sqlalchemy.exc.IntegrityError)
                if attempt == TABLE_ATTEMPTS - 1 or not (collided or "exist" in str(error).lower()):
                    raise
                time.sleep(random.uniform(0.2, 1.0))
    raise AssertionError("unreachable")


TABLE_ATTEMPTS = 5


def _retry_callback(settings: config.StudySettings):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=settings.max_retries)


def _as_retried(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """The trial as its retry inherits it: without the dead worker's identity and MLflow run,
    which the worker that runs it again sets anew (until then no one takes it for dead)."""
    retried = copy.copy(trial)
    dead = (WORKER_ATTR, PROCESS_ATTR, tracking.TRIAL_RUN_ATTR, "fail_reason")
    retried.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in dead}
    return retried


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
    """Fail and retry the RUNNING trials of worker processes known to have ended (killed or
    crashed) on this machine: at once, rather than after the heartbeat grace period. `pids`:
    only those processes' trials (this launcher's workers, known dead). Returns the failed
    trials' numbers."""
    retry = _retry_callback(settings)
    failed = []
    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        process = trial.user_attrs.get(PROCESS_ATTR)
        if pids is not None and (process or {}).get("pid") not in pids:
            continue
        if not _gone(process):
            continue
        try:
            optuna_study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # Finished meanwhile (by a heartbeat check elsewhere).
        frozen = optuna_study.get_trials(deepcopy=False)[trial.number]
        retry(optuna_study, _as_retried(frozen))
        pid, host = process["pid"], socket.gethostname()
        _close_run_of(frozen, f"its worker process {pid} on {host} died (killed or crashed)")
        log.warning(
            f"trial {trial.number}: its worker process {pid} died; failed, and queued to run again"
        )
        failed.append(trial.number)
    return failed


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
    definition: study_file.StudyDefinition,
    storage: str | None,
    join: bool = False,
    fingerprint: dict | None = None,
) -> optuna.Study:
    """The study named in the file, created in `storage` or resumed from it, by any number of
    workers at once on any machines; with `join`, it must exist already. The first worker
    records the study's `fingerprint` and enqueues its warm start; a worker whose fingerprint
    differs is refused, saying what differs."""
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
        # Race-safe: of workers creating it at once, one does and the others load it.
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
    if fingerprint is not None:
        problem = fingerprint_problem(claim(study, FINGERPRINT_ATTR, fingerprint), fingerprint)
        if problem:
            raise ValueError(
                f"{definition.path}: study '{study.study_name}' in {config.redact(url)} was "
                f"started from other settings, and this worker would tune something else: "
                f"{problem}. Give every worker the same study file, data and digitune, or name "
                "a new study in [study] to start afresh"
            )
    if not join and claim(study, WARM_START_ATTR, worker_id()) == worker_id():
        # One worker enqueues the warm start; Optuna skips a configuration it has already run
        # or queued, so a resumed study does not repeat it.
        for params in definition.enqueued:
            study.enqueue_trial(params, skip_if_exists=True)
    # Workers must not draw the same configurations, and a resumed study must not replay its
    # first draws, so each worker's seed moves on by its slot and the trials already run; one
    # uninterrupted worker (slot 0) is reproducible from the seed alone.
    seed = definition.study.seed + 1000 * _slot(study) + len(study.trials)
    study.sampler = make_sampler(definition.study, seed)
    return study


# The study's user attribute naming the worker that enqueued its warm start, and those that
# number its workers ("worker_slot.<n>": the worker's id).
WARM_START_ATTR, SLOT_ATTR = "warm_start_by", "worker_slot"


def _slot(optuna_study: optuna.Study) -> int:
    """This worker's number among every worker the study has had: the first free slot."""
    me = worker_id()
    taken = [key for key in optuna_study.user_attrs if key.startswith(SLOT_ATTR + ".")]
    for number in itertools.count(len(taken)):
        if claim(optuna_study, f"{SLOT_ATTR}.{number}", me) == me:
            return number
    raise AssertionError("unreachable")


def claim(optuna_study: optuna.Study, key: str, value, replacing=None):
    """Set the study's user attribute `key` to `value` unless it has one (or, with
    `replacing`, only while it is still `replacing`): a compare-and-set that the database
    decides, so of any number of processes claiming at once, on any machines, exactly one
    sets it. Returns the attribute as it is then: `value` for the one that set it, the
    winner's for the others."""
    storage = optuna_study._storage
    # Optuna's storage is wrapped in a cache; the database is behind it. Optuna's own
    # set_study_user_attr reads before it writes, so two writers both win; an INSERT into
    # its table, whose key is (study, attribute), lets one win.
    storage = getattr(storage, "_backend", storage)
    study_id = storage.get_study_id_from_name(optuna_study.study_name)
    attribute = rdb_models.StudyUserAttributeModel
    session = storage.scoped_session()
    try:
        if replacing is None:
            session.add(attribute(study_id=study_id, key=key, value_json=json.dumps(value)))
        else:
            session.query(attribute).filter_by(
                study_id=study_id, key=key, value_json=json.dumps(replacing)
            ).update({"value_json": json.dumps(value)})
        session.commit()
    except sqlalchemy.exc.IntegrityError:
        session.rollback()  # Another process set it first.
    finally:
        session.close()
    return storage.get_study_user_attrs(study_id)[key]


def fingerprint(definition: study_file.StudyDefinition, digest: str) -> dict:
    """What a study's trials depend on, recorded by its first worker and checked by every
    other: its settings (the study file's, budgets aside), its data's SHA-256 and the digitune
    version that trains them."""
    settings = {
        key: value
        for key, value in definition.resolved().items()
        if key not in tracking.INVOCATION_KEYS
    }
    text = json.dumps(settings, sort_keys=True, default=str)
    reference = definition.builder
    return {
        "settings_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "settings": json.loads(text),
        "data_sha256": digest,
        "digitune": __version__,
        # A network of the user's own: its module's code, which the study file does not hold.
        "builder_sha256": builder.source_sha256(reference) if reference else "",
    }


def fingerprint_problem(recorded: dict, ours: dict) -> str | None:
    """What differs between the study's fingerprint and this worker's, in words; None if
    nothing does."""
    problems = []
    if recorded.get("digitune") != ours["digitune"]:
        problems.append(
            f"digitune {recorded.get('digitune')} started it and this is {ours['digitune']}"
        )
    if recorded.get("builder_sha256", "") != ours.get("builder_sha256", ""):
        problems.append(
            f"the module of its builder {ours['settings'].get('fixed.builder', '')} differs "
            f"(SHA-256 {str(recorded.get('builder_sha256'))[:16]}... in the study, "
            f"{str(ours.get('builder_sha256'))[:16]}... here)"
        )
    if recorded.get("data_sha256") != ours["data_sha256"]:
        problems.append(
            f"its data has SHA-256 {str(recorded.get('data_sha256'))[:16]}..., this worker's "
            f"{ours['data_sha256'][:16]}... ([data], MNIST_DIR)"
        )
    if recorded.get("settings_sha256") != ours["settings_sha256"]:
        before, now = recorded.get("settings", {}), ours["settings"]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                table, _, name = key.partition(".")
                table = {"fixed": "space", "when": "space"}.get(table, table)
                problems.append(
                    f"[{table}] {name} is {before.get(key, '(unset)')} in the study, "
                    f"{now.get(key, '(unset)')} here"
                )
    return "; ".join(problems) or None


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
    stop: threading.Event | None = None,
) -> None:
    """Run trials in this process until the study has its trials, the deadline passes or
    `stop` is set (Ctrl-C, SIGTERM).

    Once the study's total is reached, counting other workers' running trials, the worker
    waits for those to finish rather than leave: a worker that died (on any machine) has its
    trial failed once its heartbeats stop, and a live one runs it again."""
    total, stop = definition.study.n_trials, stop or threading.Event()
    callbacks = [_StopAtTotal(total), lambda study, trial: log.info(trial_line(trial, label))]
    while not stop.is_set():
        remaining = total - count(study, (*FINISHED_STATES, TrialState.RUNNING))
        timeout = deadline - time.time() if deadline else None
        if timeout is not None and timeout <= 0:
            return
        if remaining > 0:
            study.optimize(
                objective,
                n_trials=remaining,
                # Whole seconds: Optuna's progress bar prints the timeout as given.
                timeout=max(1, round(timeout)) if timeout is not None else None,
                # A failing trial (diverged, out of memory, ...) is recorded; the study goes on.
                catch=(Exception,),
                callbacks=callbacks,
                show_progress_bar=progress_bar,
            )
            progress_bar = False  # One bar: later rounds run the few retried trials.
            continue
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return
        # Others' trials still run: fail those whose worker stopped beating (and queue them
        # again), then look again.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        stop.wait(min(5.0, definition.study.heartbeat_seconds))


class _StopAtTotal:
    """Stops `optimize` once the study has its total of trials, counting every worker's
    running ones, so that all workers stop at the total. (Two workers finishing at the same
    instant may still both start one more: at most one trial too many per extra worker.)"""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if count(study, (*FINISHED_STATES, TrialState.RUNNING)) >= self.total:
            study.stop()


def count(study: optuna.Study, states=FINISHED_STATES) -> int:
    """The study's trials in `states` (finished ones by default), a trial whose worker died
    left out once it has been queued to run again: its retry takes its place."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return sum(1 for t in trials if t.state in states and t.number not in retried)


def others_running(study: optuna.Study) -> bool:
    """Whether workers other than this process are running trials of the study."""
    return any(
        trial.user_attrs.get(WORKER_ATTR) != worker_id()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )


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
