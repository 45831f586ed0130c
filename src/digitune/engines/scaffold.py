"""What every engine does around its trials: the one scaffold of a study run.

1. `prepare`: read the study file, apply the command line's budget, check that the tracking
   store answers (before anything loads or trains), load its dataset and split it; every
   trial's params get the data's shape and classes;
2. `parent_run`: the study's MLflow parent run, opened (or reopened) with the resolved
   configuration and datasets, and closed FINISHED, KILLED or FAILED as the block ends;
3. the engine runs its trials as children of that run;
4. `finalize`: rebuild the best trial's model from its logged weights, evaluate it on the test
   set (the only time the test set is touched) and register it as `@challenger`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna

from digitune import data, datasets, evaluate, model, objectives, records, registry, space, tracking

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A study's definition with its budget applied, its data, and when its time is up."""

    definition: space.StudyDefinition
    dataset: datasets.Dataset
    split: data.Split
    # A `time.time()` value, the same in every worker process, or None.
    deadline: float | None


@dataclasses.dataclass(frozen=True)
class BestTrial:
    """The best trial of a study, whichever engine ran it: enough to rebuild its model."""

    study_name: str
    number: int
    params: dict
    run_id: str
    validation_accuracy: float
    engine: str = "optuna"
    costs: dict | None = None  # in a study with [objectives]: `digitune.costs`'s

    @classmethod
    def of(cls, study: optuna.Study, number: int | None = None) -> BestTrial:
        """The study's best trial (the most accurate within its limits), or trial `number`."""
        best = objectives.best_trial(study) if number is None else study.trials[number]
        return cls(
            study.study_name,
            best.number,
            space.params_of(best),
            best.user_attrs[tracking.TRIAL_RUN_ATTR],
            objectives.accuracy(best),
            costs=best.user_attrs.get(objectives.COSTS_ATTR),
        )


def prepare(
    study_file: str | Path | space.StudyDefinition,
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
) -> Inputs:
    """The study's inputs; fails before loading data or training if the store is down."""
    if not isinstance(study_file, space.StudyDefinition):
        study_file = space.load(study_file)
    definition = study_file.with_budget(n_trials, timeout_minutes)
    tracking.configure()
    dataset = datasets.load(definition.data)
    if not dataset.canonical:
        log.warning(
            "%s is not the published %s (only its own SHA256SUMS vouches for it): "
            "figures from this study are not %s figures",
            dataset.source,
            dataset.name,
            dataset.name,
        )
    definition = with_data(definition, dataset)
    training = definition.training
    split = data.split(dataset, training.train_images, training.validation_images)
    timeout = definition.study.timeout_minutes * 60
    return Inputs(definition, dataset, split, time.time() + timeout if timeout else None)


def with_data(definition: space.StudyDefinition, dataset: datasets.Dataset):
    """The definition with the dataset's shape and classes among its fixed params, once the
    search space is known to fit the pictures."""
    blocks = definition.distributions.get("num_conv_blocks")
    most = getattr(blocks, "high", definition.fixed.get("num_conv_blocks", 1))
    problem = model.blocks_problem(int(most), dataset.image_shape)
    if problem:
        raise ValueError(f"{definition.path} [space] 'num_conv_blocks': {problem}")
    fixed = {**definition.fixed, **dataset.params}
    return dataclasses.replace(definition, fixed=fixed)


@contextlib.contextmanager
def parent_run(
    inputs: Inputs, *, experiment: str, run_name: str, run_id: str | None, tags: dict[str, str]
) -> Iterator[str]:
    """The study's parent run (reopened when `run_id` still exists), as a context that
    yields its id and ends the run with the block."""
    dataset, split = inputs.dataset, inputs.split
    source, digest, name = dataset.source, dataset.digest[:16], dataset.name
    datasets_logged = {
        "training": tracking.dataset(split.x_train, split.y_train, f"{name}-train", source, digest),
        "validation": tracking.dataset(
            split.x_validation, split.y_validation, f"{name}-validation", source, digest
        ),
    }
    resolved = {
        **inputs.definition.resolved(),
        "data_sha256": dataset.digest,
        "data_canonical": dataset.canonical,
        "data_class_names": ", ".join(dataset.class_names),
    }
    if dataset.test_files_sha256:
        resolved["data_test_files_sha256"] = dataset.test_files_sha256
    with tracking.study_run(
        experiment, run_name, run_id, resolved, datasets_logged, tags
    ) as parent:
        yield parent


def finalize(
    best: BestTrial,
    inputs: Inputs,
    parent_run_id: str,
    register: bool = True,
    run_id: str | None = None,
) -> tuple[float, str | None]:
    """Rebuild the best trial's model from its params and weights, evaluate it on the test
    set into the parent run (or `run_id`), and (with `register`) register it as @challenger,
    with its costs as tags and its int8 TFLite file beside it when it has them, unless that
    trial already is. Returns the test accuracy and the registered version."""
    dataset, model_name = inputs.dataset, inputs.definition.model_name
    with mlflow.start_run(run_id=run_id or parent_run_id):
        cnn = records.load_model(best.params, best.run_id)
        test = evaluate.evaluate(cnn, data.preprocess(dataset.test_images), dataset.test_labels)
        records.log_evaluation(
            test, "test", f"trial {best.number}, {dataset.name} test set", dataset.class_names
        )
        mlflow.log_metrics(
            {"test_accuracy": test.accuracy, "best_val_accuracy": best.validation_accuracy}
        )
        mlflow.set_tags({"best_trial": str(best.number)})
        if not register:
            return test.accuracy, None
        cost_tags = objectives.version_tags(best.costs)
        existing = registry.find_version(best.study_name, best.number, model_name=model_name)
        if existing is not None:
            log.info("trial %d is already registered as version %s", best.number, existing.version)
            return test.accuracy, str(existing.version)
        if best.costs:
            records.copy_int8_file(best.run_id)
        version = registry.register(
            cnn,
            model_name=model_name,
            study_name=best.study_name,
            trial_number=best.number,
            params=best.params,
            validation_accuracy=best.validation_accuracy,
            test_accuracy=test.accuracy,
            test_images=len(dataset.test_labels),
            data_sha256=dataset.digest,
            engine=best.engine,
            extra_tags={**datasets.version_tags(dataset, inputs.definition.data), **cost_tags},
        )
    return test.accuracy, str(version.version)
