"""Benchmarks: measured side by side in one run, reported as medians and percentiles.

    digitune bench                                     throughput, the tuning race, the ablation
    digitune bench --only throughput                   training throughput (`throughput`)
    digitune bench --only race --budget-minutes 10     tuning race, tracking overhead (`race`)
    digitune bench --only ablation                     the default study's levers (`contenders`)
    digitune bench --only own-pictures                 defaults on own pictures (`own_pictures`)
    digitune bench-serve --url http://127.0.0.1:8000   a running service (`serving`)

Benchmarks are not tests: the machines are shared and noisy, so they report numbers for a
person to read, and assert nothing. `write_results` keeps each table in bench/results/ and in
MLflow's `benchmarks` experiment.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import mlflow
import pandas as pd
from matplotlib.figure import Figure

from digitune import config, tracking


def write_results(name: str, table: pd.DataFrame, figure: Figure | None = None) -> Path:
    """bench/results/<name>.md and .csv, dated and with the machine, also logged to MLflow's
    `benchmarks` experiment. Returns the Markdown file."""
    folder = config.project_dir() / "bench" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU threads"
    markdown = folder / f"{name}.md"
    markdown.write_text(f"{name}, {stamp}, {machine}\n\n{table.to_markdown(index=False)}\n")
    table.to_csv(folder / f"{name}.csv", index=False)
    if figure is not None:
        figure.savefig(folder / f"{name}.png", dpi=120)
    client = tracking.configure(create=True)
    with mlflow.start_run(
        experiment_id=tracking.experiment_id(client, "benchmarks"), run_name=f"{name} {stamp}"
    ):
        mlflow.log_artifact(str(markdown))
        mlflow.log_artifact(str(folder / f"{name}.csv"))
        mlflow.log_table(table, f"{name}.json")
        if figure is not None:
            mlflow.log_artifact(str(folder / f"{name}.png"))
    return markdown
