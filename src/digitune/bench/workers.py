"""Workers on one machine: the quick study's trials per minute with one worker and with two,
as `digitune tune` runs them, side by side.

    digitune bench --only workers [--repeats 3]

Both arms run the same configurations, drawn once from the quick study's space (Optuna's
random sampler, seed 0) and enqueued in the same order, none pruned: the ratio measures the
workers, not what a sampler happened to draw. Each arm is `digitune tune --workers N
--no-register` in a fresh project folder; the arms alternate, and which goes first alternates
from round to round. Trials per minute count from the first trial's start to the last one's
end, past the processes' start-up.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import optuna
import pandas as pd

from digitune import config, space, study_file

log = logging.getLogger(__name__)

STUDY = "quick"
TRIALS = 24


def configurations(definition: study_file.StudyDefinition, count: int, seed: int = 0) -> list:
    """`count` configurations of the study's space, as its random sampler draws them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drawing = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(count):
        trial = drawing.ask()
        space.suggest(trial, definition)
        drawn.append(dict(trial.params))
        drawing.tell(trial, 0.0)
    return drawn


def study_text(source: Path, enqueued: list[dict]) -> str:
    """The study file at `source`, unpruned, with `enqueued` as its warm start."""
    document = tomllib.loads(source.read_text(encoding="utf-8"))
    document["study"] = {**document.get("study", {}), "pruner": "none"}
    document["enqueue"] = enqueued
    return _toml(document)


def _toml(document: dict) -> str:
    """A study file's tables as TOML: plain values, lists and inline tables."""

    def value(item) -> str:
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{key} = {value(v)}" for key, v in item.items()) + " }"
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return json.dumps(item)  # Strings, numbers and booleans are written alike.

    lines = []
    for table, content in document.items():
        for entry in content if isinstance(content, list) else [content]:
            lines.append(f"[[{table}]]" if isinstance(content, list) else f"[{table}]")
            lines += [f"{key} = {value(v)}" for key, v in entry.items()]
            lines.append("")
    return "\n".join(lines)


def run_arm(text: str, workers: int, trials: int) -> dict:
    """One `digitune tune --workers N` of the study in a fresh project folder: its trials per
    minute, from the first trial's start to the last one's end."""
    with tempfile.TemporaryDirectory(prefix="digitune-workers-") as folder:
        home = Path(folder)
        (home / "studies").mkdir()
        path = home / "studies" / f"{STUDY}.toml"
        path.write_text(text)
        environment = {**os.environ, "DIGITUNE_HOME": str(home)}
        environment.pop("MLFLOW_TRACKING_URI", None)
        command = [sys.executable, "-m", "digitune", "tune", "--study", str(path)]
        command += ["--workers", str(workers), "--trials", str(trials), "--no-register"]
        subprocess.run(command, env=environment, cwd=home, check=True, capture_output=True)
        storage = f"sqlite:///{home / 'studies' / (STUDY + '.db')}"
        study = optuna.load_study(study_name=STUDY, storage=storage)
        done = [t for t in study.trials if t.datetime_complete is not None]
        span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
        seconds = span.total_seconds()
        return {
            "workers": workers,
            "trials": len(done),
            "seconds": round(seconds, 1),
            "trials_per_minute": round(len(done) / seconds * 60, 2),
        }


def workers_throughput(rounds: int = 3, trials: int = TRIALS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every arm of every round, and the summary: the median trials per minute of each arm
    and, for two workers, the median of the rounds' ratios to one."""
    source = config.study_path(STUDY)
    text = study_text(source, configurations(study_file.load(source), trials))
    rows = []
    for number in range(rounds):
        arms = (1, 2) if number % 2 == 0 else (2, 1)
        for workers in arms:
            rows.append({"round": number + 1, **run_arm(text, workers, trials)})
            log.info(
                "round %d: %d worker(s), %d trials in %.0f s, %.1f a minute",
                number + 1,
                workers,
                rows[-1]["trials"],
                rows[-1]["seconds"],
                rows[-1]["trials_per_minute"],
            )
    runs = pd.DataFrame(rows)
    rates = runs.pivot(index="round", columns="workers", values="trials_per_minute")
    summary = pd.DataFrame(
        {
            "workers": [1, 2],
            "median_trials_per_minute": [rates[1].median(), rates[2].median()],
            "ratio_to_one_worker": [1.0, round(float((rates[2] / rates[1]).median()), 2)],
            "rounds": [rounds, rounds],
        }
    )
    return runs, summary
