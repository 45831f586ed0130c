"""Free the disk that finished trials take and nobody will use again: `digitune gc`.

    digitune gc [--keep 5] [--dry-run]

Every trial run keeps its weights and confusion matrices as MLflow artifacts, a few hundred
kilobytes to megabytes each; a long study leaves hundreds. For each study (each parent run in
the MLflow store, Optuna's and Keras Tuner's alike) this keeps the artifacts of the `keep` best
completed trials, which refits and ensembles rebuild from, of the best one even with `--keep
0` (resume, refit and registration rebuild it), and of every trial on a study's Pareto front
(`select` registers from it); it deletes those of every other ended trial: pruned, failed and
lower-ranked ones. Runs, params, metrics and tags stay, so the
MLflow UI still compares every trial; registered models are stored apart and are never
touched; running trials are left alone. Then MLflow's own garbage collection removes the runs
deleted in the UI, for the project's local store. `--dry-run` reports what would go.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import subprocess
import sys

import mlflow
import pandas as pd
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from digitune import config, pareto, tracking

DELETED_TAG = "digitune.artifacts_deleted"


@dataclasses.dataclass(frozen=True)
class Cleanup:
    """What `collect` deleted (or would delete): one row per trial run."""

    runs: pd.DataFrame  # study, trial, state, reason, bytes
    dry_run: bool
    mlflow_gc: str  # what MLflow's own garbage collection did, in words

    @property
    def freed_bytes(self) -> int:
        return int(self.runs["bytes"].sum()) if len(self.runs) else 0


def collect(keep: int = 5, dry_run: bool = False) -> Cleanup:
    """Delete the artifacts of every ended trial run but each study's `keep` best."""
    if keep < 0:
        raise ValueError(f"--keep must not be negative, got {keep}")
    client = tracking.configure()
    rows = []
    for experiment in client.search_experiments():
        parents = client.search_runs(
            [experiment.experiment_id], "tags.`digitune.role` = 'study'", max_results=10_000
        )
        for parent in parents:
            for run, reason in _unwanted_trials(client, parent, keep):
                size = _artifact_bytes(client, run.info.run_id)
                if size == 0:
                    continue  # Nothing left to free (collected before).
                rows.append(
                    {
                        "study": parent.info.run_name,
                        "trial": int(run.data.tags["trial_number"]),
                        "state": run.data.tags.get("state", ""),
                        "reason": reason,
                        "bytes": size,
                    }
                )
                if not dry_run:
                    get_artifact_repository(run.info.artifact_uri).delete_artifacts()
                    stamp = datetime.datetime.now().isoformat(timespec="seconds")
                    client.set_tag(run.info.run_id, DELETED_TAG, f"digitune gc, {stamp}")
    runs = pd.DataFrame(rows, columns=["study", "trial", "state", "reason", "bytes"])
    return Cleanup(runs, dry_run, "not run (dry run)" if dry_run else _mlflow_gc())


def _unwanted_trials(client: mlflow.MlflowClient, parent, keep: int):
    """The ended trial runs of a study outside its `keep` best completed ones, with why."""
    trials = [
        run
        for run in tracking.child_runs(parent.info.run_id)
        if "trial_number" in run.data.tags and run.info.status != "RUNNING"
    ]
    completed = [run for run in trials if run.data.tags.get("state") == "COMPLETE"]
    best = {run.info.run_id: _best_validation_accuracy(client, run) for run in completed}
    ranked = sorted(best, key=best.get, reverse=True)
    kept = set(ranked[: max(keep, 1)]) | _on_the_front(parent, completed, best)
    for run in trials:
        state = run.data.tags.get("state", "")
        if run.info.run_id in kept:
            continue
        if state == "COMPLETE":
            yield run, f"not among the {keep} best (rank {ranked.index(run.info.run_id) + 1})"
        else:
            yield run, state.lower() or "ended"


def _on_the_front(parent, completed: list, accuracy: dict[str, float]) -> set[str]:
    """The run ids of the completed trials on the study's Pareto front, which `select`
    chooses from: the feasible ones (within the study's limits) that no other beats in
    accuracy and in every cost it minimises (the parameter count when it only limits)."""
    measured = [run for run in completed if "params" in run.data.metrics]
    if not measured:
        return set()  # The study measured no costs: it has no front.
    params = parent.data.params
    minimized = ast.literal_eval(params.get("objectives.minimize") or "()")
    costs = list(minimized) or ["params"]
    limits = {c: float(params.get(f"objectives.max_{c}") or 0) for c in config.COSTS}
    rows = pd.DataFrame(
        [
            {
                "run": run.info.run_id,
                pareto.ACCURACY: accuracy[run.info.run_id],
                **{cost: run.data.metrics.get(cost, float("inf")) for cost in config.COSTS},
                "feasible": all(
                    not limit or run.data.metrics.get(cost, float("inf")) <= limit
                    for cost, limit in limits.items()
                ),
            }
            for run in measured
        ]
    )
    return set(pareto.front(rows, costs)["run"])


def _best_validation_accuracy(client: mlflow.MlflowClient, run) -> float:
    history = client.get_metric_history(run.info.run_id, config.OBJECTIVE_METRIC)
    return max((point.value for point in history), default=float("-inf"))


def _artifact_bytes(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> int:
    total = 0
    for item in client.list_artifacts(run_id, path):
        total += _artifact_bytes(client, run_id, item.path) if item.is_dir else item.file_size or 0
    return total


def _mlflow_gc() -> str:
    """MLflow's garbage collection of runs deleted in the UI, for the local store (a tracking
    server's store is its administrator's to collect)."""
    if config.tracking_uri() != config.local_tracking_uri():
        return "not run: the store is a tracking server's, collect it there with `mlflow gc`"
    finished = subprocess.run(
        [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", config.local_tracking_uri()],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if finished.returncode != 0:
        return f"failed: {finished.stderr.strip().splitlines()[-1:]}"
    return "removed the runs deleted in the MLflow UI, with their artifacts"


def summary(cleanup: Cleanup) -> str:
    """The lines `digitune gc` prints."""
    verb = "would free" if cleanup.dry_run else "freed"
    if cleanup.runs.empty:
        lines = ["nothing to free: every ended trial outside the best already has no artifacts"]
    else:
        per_study = (
            cleanup.runs.groupby("study")
            .agg(trial_runs=("trial", "count"), megabytes=("bytes", "sum"))
            .assign(megabytes=lambda table: (table["megabytes"] / 1e6).round(1))
        )
        lines = [per_study.to_string(), ""]
        lines.append(
            f"{verb} {cleanup.freed_bytes / 1e6:.1f} MB of artifacts of "
            f"{len(cleanup.runs)} trial runs"
        )
    lines.append(f"MLflow's garbage collection: {cleanup.mlflow_gc}")
    return "\n".join(lines)
