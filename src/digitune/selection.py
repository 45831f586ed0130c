"""Pick a model for a device from a study's Pareto front and register it as @challenger.

    digitune select --study studies/edge.toml --max-params 10000
    digitune select --study studies/edge.toml --max-latency-ms 0.5 --max-kb 20

Takes the most accurate trial on the study's front (`digitune.objectives`) within the given
limits, chosen on validation accuracy and costs only; then tests it on the test set (the
first time the test set sees it), registers it as a version with every objective as tags and
its int8 TFLite file beside it, and points @challenger at it, so that it goes through the
same `make promote` gate as any other model. Its single-image latency is measured once more
through the registered model itself, as `digitune serve` loads it (`served_latency_ms`).
A trial registered before (by `make tune`, say) is not registered twice: @challenger moves to
its version.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np

from digitune import config, costs, data, objectives, registry, study, tracking
from digitune.engines import scaffold


@dataclasses.dataclass(frozen=True)
class Selected:
    trial: int
    validation_accuracy: float
    test_accuracy: float
    costs: dict
    model_name: str
    version: str
    served_latency_ms: float


def run(study_file: str | Path, storage: str | None, limits: dict[str, float]) -> Selected:
    """Select, test and register the most accurate front model within `limits`."""
    tracking.configure()
    definition, optuna_study = study.load_existing(study_file, storage)
    trials = objectives.table(optuna_study)
    if trials.empty:
        raise ValueError(
            f"study '{optuna_study.study_name}' has no completed trial that measured its costs; "
            f"give {study_file} an [objectives] table (see studies/edge.toml) and tune it"
        )
    chosen = objectives.choose(trials, objectives.front_costs(definition.objectives), limits)
    number = int(chosen["trial"])
    inputs = scaffold.prepare(definition)
    best = scaffold.BestTrial.of(optuna_study, number)
    parent_run_id = optuna_study.user_attrs[tracking.PARENT_RUN_ATTR]
    wanted = {f"select_max_{cost}": limit for cost, limit in limits.items()}
    with tracking.child_run(
        parent_run_id, f"select-trial-{number}", {"kind": "select", "trial_number": str(number)}
    ) as run:
        mlflow.log_params(wanted or {"select_max": "none"})
    test_accuracy, version = scaffold.finalize(best, inputs, parent_run_id, run_id=run.info.run_id)
    model_name = definition.model_name
    client = mlflow.MlflowClient()
    registered = client.get_model_version(model_name, version)
    served = registry.load_pyfunc(registered)
    image = data.preprocess(inputs.dataset.test_images[:1]).astype(np.float32)
    served_latency, _ = costs.latency(served.predict, image)
    registry.describe_version(
        version,
        {**objectives.version_tags(best.costs), "served_latency_ms": f"{served_latency:.3f}",
         **{key: f"{value:g}" for key, value in wanted.items()}},
        registered.description,
        config.CHALLENGER_ALIAS,
        model_name,
    )  # fmt: skip
    return Selected(
        number,
        best.validation_accuracy,
        test_accuracy,
        dict(best.costs or {}),
        model_name,
        version,
        served_latency,
    )
