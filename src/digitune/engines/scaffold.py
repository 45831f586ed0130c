"""What every engine does around its trials: the one scaffold of a study run.

1. `prepare`: read the study file, apply the command line's budget, check that the tracking
   store answers (before anything loads or trains), load its dataset and split it; every
   trial's params get the data's shape and classes;
2. `parent_run`: the study's MLflow parent run, opened (or reopened) with the resolved
   configuration and datasets, and closed FINISHED, KILLED or FAILED as the block ends;
3. the engine runs its trials as children of that run;
4. `registry.register_best`: rebuild the best trial's model from its logged weights, evaluate
   it on the test set (the only time the test set is touched) and register it as
   `@challenger`;
5. the engine reports an `Outcome`, the same for every engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import optuna

from digitune import backend, data, model, registry, sizing, study_file, tracking

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A study's definition with its budget applied, its data, and when its time is up."""

    definition: study_file.StudyDefinition
    dataset: data.Dataset
    split: data.Split
    # A `time.time()` value, the same in every worker process, or None.
    deadline: float | None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a finished search reports, whichever engine ran it (`digitune tune` prints it)."""

    study_name: str
    engine: str
    seconds: float
    # Trials by how they ended ("complete", "pruned", "fail", "complete, cut by the deadline").
    states: dict[str, int]
    best: registry.BestTrial
    test_accuracy: float
    model_version: str | None  # None when nothing was registered
    model_name: str
    parent_run_id: str
    # Optuna's study, for the Optuna engine.
    study: optuna.Study | None = None
    # The best configuration retrained on every training image (`--refit`), or None.
    refit: object | None = None
    # Worker processes that died (killed, crashed) while the study ran, in words; their
    # trials were failed and run again by the others.
    worker_deaths: tuple[str, ...] = ()

    @property
    def trials(self) -> int:
        return sum(self.states.values())


def prepare(
    source: str | Path | study_file.StudyDefinition,
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
) -> Inputs:
    """The study's inputs (from a study file, or its definition); fails before loading data
    or training if the store is down."""
    if not isinstance(source, study_file.StudyDefinition):
        source = study_file.load(source)
    definition = source.with_budget(n_trials, timeout_minutes)
    tracking.configure(create=True)
    dataset = data.load(definition.data)
    if not dataset.canonical:
        log.warning(
            "%s is not the published %s (only its own SHA256SUMS vouches for it): "
            "figures from this study are not %s figures",
            dataset.source,
            dataset.name,
            dataset.name,
        )
    problem = registry.task_problem(definition.model_name, dataset)
    if problem is not None:
        # Found before training: its best model could never be compared with that champion.
        raise ValueError(
            f"{definition.path} [registry]: {problem}; set model_name to a model of "
            f"{dataset.name} (the default is {dataset.name}-cnn)"
        )
    training = definition.training
    described = backend.describe(training.precision)
    log.info(
        "%s on %s; precision %s (%s)",
        described["backend"],
        described["devices"],
        described["precision"],
        described["precision_why"],
    )
    split = data.split(dataset, training.train_images, training.validation_images)
    definition, line = sizing.sized(
        definition,
        len(split.y_train),
        dataset.image_shape,
        len(dataset.class_names),
        mnist=dataset.name == "mnist",
    )
    if line:
        log.info("%s", line)
        definition = dataclasses.replace(definition, sized=line)
    definition = with_data(definition, dataset)
    timeout = definition.study.timeout_minutes * 60
    return Inputs(definition, dataset, split, time.time() + timeout if timeout else None)


def with_data(definition: study_file.StudyDefinition, dataset: data.Dataset):
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
    inputs: Inputs,
    *,
    experiment: str,
    run_name: str,
    run_id: str | None,
    tags: dict[str, str],
    **shared,
) -> Iterator[str]:
    """The study's parent run (reopened when `run_id` still exists), as a context that
    yields its id and ends the run with the block; `shared`: how workers that share it agree
    on one (`tracking.study_run`'s claim and others_running)."""
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
    described = backend.describe(inputs.definition.training.precision)
    tags = {**tags, "backend": described["backend"], "devices": described["devices"]}
    with tracking.study_run(
        experiment, run_name, run_id, resolved, datasets_logged, tags, **shared
    ) as parent:
        yield parent
