"""A study file's tables into the typed settings of `digitune.config`, failing loudly.

Unknown keys, wrong types, values outside a setting's choices and negative numbers are each a
ValueError naming the file, the table and the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

from digitune import config

# A study's name becomes a file name under studies/, an MLflow run name and a value in registry
# queries: letters, digits and - _ . only, starting with a letter or digit.
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

_CHOICES = {
    (config.TrainingSettings, "precision"): config.PRECISIONS,
    (config.StudySettings, "sampler"): config.SAMPLERS,
    (config.StudySettings, "pruner"): config.PRUNERS,
    (config.DataSettings, "dataset"): config.DATASETS,
    (config.DataSettings, "color_mode"): config.COLOR_MODES,
    (config.ObjectiveSettings, "minimize"): config.COSTS,
}


def settings_from_table(cls: type, table: object, source: str):
    """Build a settings dataclass from a TOML table, failing loudly on unknown keys and types.

    `source` names the file and table (for example `studies/quick.toml [study]`) so that
    the error tells the user exactly what to fix.
    """
    if not isinstance(table, dict):
        raise ValueError(f"{source}: expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if (cls, key) == (config.StudySettings, "direction"):
            raise ValueError(
                f"{source}: 'direction' is not a setting: every study maximises "
                f"{config.OBJECTIVE_METRIC} (and minimises the [objectives] table's costs)"
            )
        if cls is config.ObjectiveSettings and key not in fields:
            _objective_key_problem(key, source)
        if key not in fields:
            raise ValueError(
                f"{source}: unknown key '{key}'; known keys are {', '.join(sorted(fields))}"
            )
        expected = hints[key]
        if not _matches(value, expected):
            raise ValueError(f"{source}: '{key}' must be {_type_name(expected)}, got {value!r}")
        if expected is float:
            value = float(value)
        allowed = _CHOICES.get((cls, key))
        if isinstance(value, list):  # choices from `allowed`, each once
            unknown = [item for item in value if item not in allowed]
            if unknown or len(set(value)) < len(value):
                raise ValueError(
                    f"{source}: '{key}' must list some of {', '.join(allowed)} once each, "
                    f"got {value!r}"
                )
            value = tuple(value)
        elif allowed and value not in allowed:
            raise ValueError(
                f"{source}: '{key}' must be one of {', '.join(allowed)}, got {value!r}"
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{source}: '{key}' must not be negative, got {value!r}")
        values[key] = value
    return cls(**values)


def _matches(value: object, expected: object) -> bool:
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    if typing.get_origin(expected) is tuple:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if isinstance(expected, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    return isinstance(value, expected)  # type: ignore[arg-type]


def _type_name(expected: object) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return {**names, tuple[str, ...]: "a list of names"}.get(expected, str(expected))


def checked_settings(document: dict, path: Path) -> tuple:
    """The settings tables of a parsed study file, each checked and checked together:
    (study, training, data, registry, objectives)."""

    def table(cls: type, name: str):
        return settings_from_table(cls, document.get(name, {}), f"{path} [{name}]")

    study, training = (
        table(config.StudySettings, "study"),
        table(config.TrainingSettings, "training"),
    )
    data, registry = table(config.DataSettings, "data"), table(config.RegistrySettings, "registry")
    data.check(f"{path} [data]")
    if registry.model_name:
        check_study_name(registry.model_name, f"{path} [registry]", "model_name")
    check_study_name(study.name, f"{path} [study]")
    if study.workers < 1:
        raise ValueError(f"{path} [study]: 'workers' must be at least 1, got {study.workers}")
    if study.heartbeat_seconds < 1:
        raise ValueError(
            f"{path} [study]: 'heartbeat_seconds' must be at least 1, got {study.heartbeat_seconds}"
        )
    if study.heartbeat_grace_seconds <= study.heartbeat_seconds:
        raise ValueError(
            f"{path} [study]: 'heartbeat_grace_seconds' ({study.heartbeat_grace_seconds}) must be "
            f"longer than 'heartbeat_seconds' ({study.heartbeat_seconds}), or every running "
            "trial would look dead between two heartbeats"
        )
    if training.max_epochs < 1:
        raise ValueError(f"{path} [training]: 'max_epochs' must be at least 1")
    objectives = table(config.ObjectiveSettings, "objectives")
    if objectives.minimize:
        # Optuna cannot prune a multi-objective trial (it reports no single value per epoch).
        pruner = document.get("study", {}).get("pruner", "none")
        if pruner != "none":
            raise ValueError(
                f"{path} [study]: pruner = {pruner!r}, but [objectives] minimises "
                f"{', '.join(objectives.minimize)} too, and Optuna cannot prune a multi-objective "
                'study: set pruner = "none", or turn the costs into limits (max_...)'
            )
        study = dataclasses.replace(study, pruner="none")
    return study, training, data, registry, objectives


def _objective_key_problem(key: str, source: str) -> None:
    """A ValueError saying why `key` is not an [objectives] key, for keys that look like one."""
    objectives = f"{config.OBJECTIVE_METRIC} (maximised) and the costs {', '.join(config.COSTS)}"
    match = re.fullmatch(r"(max|min)_(.+)", key)
    if match and match[2] == config.OBJECTIVE_METRIC:
        raise ValueError(
            f"{source}: '{key}': {config.OBJECTIVE_METRIC} is the objective every study "
            f"maximises; limits (max_<cost>) are on the costs {', '.join(config.COSTS)}"
        )
    if match and match[2] not in config.COSTS:
        raise ValueError(
            f"{source}: '{key}' limits '{match[2]}', which is not an objective; objectives are "
            f"{objectives}, limited as max_<cost>"
        )
    if key in ("maximize", "objectives", "directions"):
        raise ValueError(
            f"{source}: '{key}' is not a setting: {config.OBJECTIVE_METRIC} is always maximised; "
            f"list the costs to minimise too in 'minimize' (some of {', '.join(config.COSTS)})"
        )


def check_study_name(name: str, source: str, what: str = "study name") -> None:
    """A ValueError naming `source` unless `name` is a safe study (or model) name."""
    if not STUDY_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{source}: {what} {name!r} is not allowed; use up to 100 letters, digits, "
            "'-', '_' and '.', starting with a letter or digit (no '..')"
        )
