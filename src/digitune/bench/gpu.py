"""The GPU check: what digitune does on a GPU, measured in one run of a few minutes.

    make gpu-check                  on a machine with a GPU (gpu/check.sh; see gpu/wheels.txt)
    digitune gpu-check --out DIR [--minutes 4] [--workers N] [--cpu]

1. Throughput: the trainer on the default study's biggest network (3 blocks of 48-96-192
   filters with batch normalisation, dense 256), at batch 128, 512 and 2048: the second of
   two epochs over the 50,000 tuning images, validation included, as trials train; the
   first epoch's compilation is reported apart.
2. The default study (studies/mnist-cnn.toml), time-boxed to --minutes, its workers sharing
   the GPU, in a fresh project folder, registering nothing; its best trial is tested once.
3. `--out` receives summary.json and summary.md, trials.csv, throughput.csv and the best
   trial as a bundle (best.json, best.weights.h5): `digitune register --bundle DIR` tests and
   registers it on a machine with TensorFlow, such as the one that asked for the check.

With --cpu, the same steps on a few thousand images and a half-minute study: the dry run
that CI and a developer without a GPU can do.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import keras
import pandas as pd

from digitune import artifacts, backend, config, data, model, report, study_file, tracking, trainer
from digitune.engines import optuna_search

BATCH_SIZES = (128, 512, 2048)
NETWORK = {
    "num_conv_blocks": 3,
    "num_filters": 48,
    "dense_units": 256,
    "dropout_rate": 0.3,
    "batch_normalization": True,
    "lr_schedule": "cosine",
}
# A dry run's sizes: a few thousand images, a study of half a minute.
DRY_RUN = {"train_images": 600, "validation_images": 300, "epoch_images": 300, "minutes": 0.25}


def throughput(split: data.Split, precision: str, batch_sizes=BATCH_SIZES) -> pd.DataFrame:
    """Images per second of the trainer on `NETWORK` at each batch size: the second of two
    epochs (validation included); the first epoch's compilation apart."""
    rows = []
    for batch_size in batch_sizes:
        params = {**NETWORK, "batch_size": batch_size}
        trainer.fresh_session(precision, seed=0)
        cnn = model.build_model(params)
        timer = trainer.EpochTimes()
        started = time.perf_counter()
        history = trainer.fit(cnn, params, split, 2, [timer]).history
        seconds = history["epoch_seconds"][-1]
        rows.append(
            {
                "batch_size": batch_size,
                "images_per_second": round(len(split.y_train) / seconds),
                "epoch_seconds": round(seconds, 3),
                "first_epoch_seconds": round(history["epoch_seconds"][0], 2),
                "compile_seconds": round(next(iter(history.get("compile_seconds", [])), 0.0), 2),
                "val_accuracy": round(history[config.OBJECTIVE_METRIC][-1], 4),
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
        )
    keras.mixed_precision.set_global_policy("float32")
    return pd.DataFrame(rows)


def check(out: str | Path, minutes: float = 4.0, workers: int | None = None, cpu: bool = False):
    """Run the check and write its files to `out`; returns the summary."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    definition = study_file.load(config.DEFAULT_STUDY)
    training = definition.training
    if cpu:
        sizes = {key: DRY_RUN[key] for key in ("train_images", "validation_images", "epoch_images")}
        training = dataclasses.replace(training, **sizes)
        definition = dataclasses.replace(definition, training=training)
        minutes = min(minutes, DRY_RUN["minutes"])
    described = backend.describe(training.precision)
    gpus = [device for device in backend.devices() if device.kind == "gpu"]
    workers = workers or (6 * len(gpus) if gpus else 2)
    dataset = data.load(definition.data)
    split = data.split(dataset, training.train_images)
    rates = throughput(split, training.precision)
    rates.to_csv(out / "throughput.csv", index=False)

    # The study, in a project folder of its own: its stores are thrown away, its best trial
    # travels as a bundle.
    with tempfile.TemporaryDirectory(prefix="digitune-gpu-check-") as home, config.project_at(home):
        outcome = optuna_search.run(
            definition.with_budget(n_trials=10_000, timeout_minutes=minutes),
            workers=workers,
            register=False,
            progress_bar=False,
        )
        tracking.configure(create=True)
        trials = report.trials_table(outcome.study)
        trials.to_csv(out / "trials.csv", index=False)
        compiling = [
            run.data.metrics["compile_seconds"]
            for run in tracking.child_runs(outcome.parent_run_id)
            if "compile_seconds" in run.data.metrics
        ]
        best = outcome.best
        weights = artifacts.download_weights(best.run_id, Path(home))
        shutil.copyfile(weights, out / "best.weights.h5")
    bundle = {
        "study": definition.study.name,
        "trial": best.number,
        "params": best.params,
        "validation_accuracy": best.validation_accuracy,
        "test_accuracy": outcome.test_accuracy,
        "model_name": definition.model_name,
        "data": dataclasses.asdict(definition.data),
        "data_sha256": dataset.digest,
        "backend": described["backend"],
        "devices": described["devices"],
        "precision": described["precision"],
    }
    (out / "best.json").write_text(json.dumps(bundle, indent=2))
    summary = {
        "dry_run_on_cpu": cpu,
        **described,
        "nvidia_gpus": backend.nvidia_gpus(),
        "throughput": rates.to_dict(orient="records"),
        "best_images_per_second": int(rates["images_per_second"].max()),
        "study_minutes": minutes,
        "workers": workers,
        "configurations": int(len(trials)),
        "trial_states": outcome.states,
        "median_compile_seconds": round(float(pd.Series(compiling).median()), 2)
        if compiling
        else None,
        "best_trial": best.number,
        "best_validation_accuracy": round(best.validation_accuracy, 5),
        "test_accuracy_of_best": round(outcome.test_accuracy, 5),
        "best_params": best.params,
        "check_minutes": round((time.perf_counter() - started) / 60, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(as_text(summary) + "\n")
    return summary


def as_text(summary: dict) -> str:
    """The summary as a person reads it at the end of the run."""
    rates = pd.DataFrame(summary["throughput"])
    lines = [
        f"GPU check{' (dry run on the CPU)' if summary['dry_run_on_cpu'] else ''}: "
        f"{summary['backend']} on {summary['devices']}, {summary['precision']} "
        f"({summary['precision_why']})",
        "",
        rates.to_string(index=False),
        "",
        f"default study, {summary['study_minutes']:g} min, {summary['workers']} workers: "
        f"{summary['configurations']} configurations ("
        + ", ".join(f"{count} {state}" for state, count in summary["trial_states"].items())
        + f"); median compile {summary['median_compile_seconds'] or '-'} s a trial",
        f"best trial {summary['best_trial']}: validation accuracy "
        f"{summary['best_validation_accuracy']:.4f}, test accuracy "
        f"{summary['test_accuracy_of_best']:.4f}",
        f"the whole check: {summary['check_minutes']:.1f} min",
    ]
    return "\n".join(lines)
