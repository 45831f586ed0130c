"""Register a trial trained on a machine that shares no store with this one: from the folder
`digitune gpu-check` writes (best.json, its params and figures; best.weights.h5), tested on
this machine's test set, which must be the same data.

    digitune register --bundle gpu/results/<run>/best
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from digitune import artifacts, config, data, evaluate, model, registry, tracking


def register(folder: Path, model_name: str | None = None) -> dict:
    """Test and register a trial trained elsewhere, from the folder `digitune gpu-check`
    writes (best.json, its params and figures; best.weights.h5): on this machine's test set,
    which must be the same data. Returns what both machines measured and the version."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / "best.json").read_text())
        weights = folder / "best.weights.h5"
        if not weights.is_file():
            raise FileNotFoundError(weights)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{folder}: not a trial bundle (best.json, best.weights.h5): {error}"
        ) from None
    dataset = data.load(config.DataSettings(**spec["data"]))
    if dataset.digest != spec["data_sha256"]:
        raise ValueError(
            f"{folder}: its trial trained on data with SHA-256 {spec['data_sha256'][:16]}..., "
            f"but {dataset.source} here is {dataset.digest[:16]}...: not the same data"
        )
    cnn = model.from_weights(spec["params"], weights)
    test = evaluate.evaluate(cnn, data.preprocess(dataset.test_images), dataset.test_labels)
    model_name = model_name or spec["model_name"]
    tags = {"kind": "imported", "trained_with": spec["backend"], "trained_on": spec["devices"]}
    with tracking.imported_run(spec["study"], spec["trial"], tags, spec["params"]):
        artifacts.log_weights(cnn)
        artifacts.log_evaluation(
            test, "test", f"trial {spec['trial']}, imported", dataset.class_names
        )
        mlflow.log_metrics(
            {"test_accuracy": test.accuracy, "trained_test_accuracy": spec["test_accuracy"]}
        )
        version = registry.register(
            cnn,
            model_name=model_name,
            study_name=spec["study"],
            trial_number=spec["trial"],
            params=spec["params"],
            validation_accuracy=spec["validation_accuracy"],
            test_accuracy=test.accuracy,
            test_images=len(dataset.test_labels),
            data_sha256=dataset.digest,
            extra_tags={
                **data.version_tags(dataset, config.DataSettings(**spec["data"])),
                **tags,
                "trained_test_accuracy": f"{spec['test_accuracy']:.4f}",
            },
        )
    return {
        "model_name": model_name,
        "model_version": str(version.version),
        "test_accuracy": test.accuracy,
        "trained_test_accuracy": spec["test_accuracy"],
        "trained_on": spec["devices"],
    }
