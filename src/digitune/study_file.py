"""Study files: a study's budget, training, data and search space, declared as data and checked.

A study file (`studies/*.toml`) is a short list of differences from the typed defaults in
`digitune.config`: [study], [training], [data], [registry] and [objectives] set those,
[model] may name a network builder of the user's own (`digitune.builder`), [space] names
hyperparameters of `digitune.model` or of the builder (`digitune.space` reads it), and an
optional array of [[enqueue]] tables warm-starts the study. `load` reads one into a
`StudyDefinition`.

Unknown tables and keys, wrong types, values outside a setting's choices and negative numbers
are each a ValueError naming the file, the table and the key, raised before anything trains.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from pathlib import Path

import optuna

from digitune import config, data, model, space


@dataclasses.dataclass(frozen=True)
class StudyDefinition:
    """Everything a study file says, validated."""

    path: Path
    study: config.StudySettings
    training: config.TrainingSettings
    # Sampled hyperparameters as Optuna distributions, in the file's order.
    distributions: dict[str, optuna.distributions.BaseDistribution]
    # Hyperparameters fixed for every trial.
    fixed: dict[str, object]
    # Configurations the study tries first, in the file's order (partial: the sampler fills in).
    enqueued: tuple[dict, ...] = ()
    data: config.DataSettings = config.DataSettings()
    registry: config.RegistrySettings = config.RegistrySettings()
    objectives: config.ObjectiveSettings = config.ObjectiveSettings()
    # Conditional hyperparameters: each one's `when`, as `space.read` gives it.
    conditions: dict[str, dict[str, tuple]] = dataclasses.field(default_factory=dict)
    # What the file itself sets ("training.max_epochs", "space"): the rest may be sized for
    # the data (`digitune.sizing`).
    given: frozenset[str] = frozenset()
    # The line saying what was sized for the data, once it has been ("" before, or if nothing).
    sized: str = ""

    @property
    def builder(self) -> str | None:  # the [model] builder of a network of the user's own
        return self.fixed.get(model.BUILDER_PARAM)

    @property
    def model_name(self) -> str:  # the registered model its best models become versions of
        return self.registry.model_name or f"{self.data.name}-cnn"

    def with_budget(
        self, n_trials: int | None = None, timeout_minutes: float | None = None
    ) -> StudyDefinition:
        """The definition with the command line's budget in place of the file's, checked."""
        check_budget(n_trials, timeout_minutes)
        overrides = {"n_trials": n_trials, "timeout_minutes": timeout_minutes}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if not overrides:
            return self
        return dataclasses.replace(
            self,
            study=dataclasses.replace(self.study, **overrides),
            given=self.given | {f"study.{key}" for key in overrides},
        )

    def resolved(self) -> dict:
        """The whole resolved configuration, as one flat dict for logging."""
        flat = {f"study.{k}": v for k, v in dataclasses.asdict(self.study).items()}
        flat.update({f"training.{k}": v for k, v in dataclasses.asdict(self.training).items()})
        flat.update({f"fixed.{k}": v for k, v in self.fixed.items()})
        flat.update({f"space.{k}": repr(v) for k, v in self.distributions.items()})
        flat.update({f"when.{k}": repr(v) for k, v in self.conditions.items()})
        flat.update({f"data.{k}": v for k, v in dataclasses.asdict(self.data).items()})
        flat.update({f"objectives.{k}": v for k, v in dataclasses.asdict(self.objectives).items()})
        flat["registry.model_name"] = self.model_name
        if self.sized:
            flat["sized"] = self.sized
        flat["study_file"] = str(self.path)
        return flat


def load(path: str | Path) -> StudyDefinition:
    """Read and validate a study file (a path, or a study's name: `config.study_path`); every
    error names the file and the key."""
    path = config.existing_study(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid TOML file: {error}") from None

    known = {"study", "training", "space", "enqueue", "data", "registry", "objectives", "model"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown table(s) {', '.join(unknown)}; expected [study], [training], "
            "[data], [registry], [objectives], [model], [space] and [[enqueue]]"
        )

    study, training, data, registry, objectives = checked_settings(document, path)

    builder = network_builder(document.get("model", {}), path)
    if "space" in document:
        distributions, fixed, conditions = space.read(document["space"], path, builder)
    elif builder:
        raise ValueError(
            f"{path}: no [space]; a network of your own ([model] builder) needs one that "
            f"searches its hyperparameters ({', '.join(model.hyperparameters(builder)[0])})"
        )
    else:  # sized for the data once it is loaded (`digitune.sizing`)
        distributions, fixed, conditions = {}, {}, {}
    if builder:  # in every trial's params, so that they alone rebuild its network
        fixed = {**fixed, model.BUILDER_PARAM: builder}
    enqueued = space.enqueued(document.get("enqueue", []), distributions, fixed, path, conditions)
    return StudyDefinition(
        path,
        study,
        training,
        distributions,
        fixed,
        enqueued,
        data,
        registry,
        objectives,
        conditions,
        given=frozenset(
            [f"{name}.{key}" for name in ("study", "training") for key in document.get(name, {})]
            + (["space"] if "space" in document else [])
        ),
    )


def network_builder(table: object, path: Path) -> str | None:
    """The [model] table's builder ("package.module:function", `digitune.builder`), imported
    and its declaration checked, or None for digitune's own CNN."""
    if not isinstance(table, dict):
        raise ValueError(f"{path} [model]: expected a table")
    unknown = sorted(set(table) - {"builder"})
    if unknown:
        raise ValueError(f"{path} [model]: unknown key(s) {', '.join(unknown)}; known: builder")
    reference = table.get("builder")
    if reference is None:
        return None
    try:
        model.hyperparameters(reference)
    except ValueError as error:
        raise ValueError(f"{path} [model] 'builder': {error}") from None
    return reference


# A study's name becomes a file name under studies/, an MLflow run name and a value in registry
# queries: letters, digits and - _ . only, starting with a letter or digit.
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

_CHOICES = {
    (config.TrainingSettings, "precision"): config.PRECISIONS,
    (config.TrainingSettings, "backend"): config.BACKENDS,
    (config.StudySettings, "sampler"): config.SAMPLERS,
    (config.StudySettings, "pruner"): config.PRUNERS,
    (config.DataSettings, "dataset"): (*data.SOURCES, "folder"),
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
            if not math.isfinite(value):  # inf would be no limit, nan one nothing passes
                raise ValueError(f"{source}: '{key}' must be a finite number, got {value!r}")
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
    check_workers(study.workers, f"{path} [study]: 'workers'")
    for table_name, settings, key in (("study", study, "seed"), ("data", data, "split_seed")):
        if getattr(settings, key) >= SEED_LIMIT:
            raise ValueError(
                f"{path} [{table_name}]: '{key}' must be below 2**31 ({SEED_LIMIT:,}): NumPy's "
                f"seeds are 32-bit and each trial adds its number, got {getattr(settings, key)}"
            )
    if training.steps_per_execution < 1:
        raise ValueError(f"{path} [training]: 'steps_per_execution' must be at least 1")
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


# Seeds below 2**31 leave room for the trial and worker numbers added to them, under NumPy's
# 2**32; worker processes on one machine past MAX_WORKERS only starve each other.
SEED_LIMIT = 2**31
MAX_WORKERS = 64


def check_workers(workers: int, what: str) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(
            f"{what} must be 1 to {MAX_WORKERS} worker processes on one machine, got {workers}; "
            "past one machine, run `make worker` on each of the others"
        )


def check_budget(n_trials: int | None, timeout_minutes: float | None) -> None:
    """A ValueError unless the command line's budget is one a study can run to."""
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"--trials must be at least 1, got {n_trials}")
    if timeout_minutes is not None and not (
        math.isfinite(timeout_minutes) and timeout_minutes >= 0
    ):
        raise ValueError(
            f"--timeout-minutes must be a finite number of minutes, 0 for none, "
            f"got {timeout_minutes}"
        )


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


# The tables of a study file and the settings each one holds, in the order a file has them.
TABLES = {
    "study": config.StudySettings,
    "training": config.TrainingSettings,
    "data": config.DataSettings,
    "registry": config.RegistrySettings,
    "objectives": config.ObjectiveSettings,
}


def reference() -> str:
    """docs/study-files.md: every key of a study file, its default, what it may be, and what
    it does, read off the settings and the model (`make docs` writes it; a test compares)."""
    lines = [
        "# Study files: every key",
        "",
        "Generated from `src/digitune/config.py` and `src/digitune/model.py` by `make docs`;",
        "`tests/test_space.py` checks that it agrees with the code. A study file is a short list",
        "of differences from these defaults; `studies/` has examples.",
    ]
    for table, cls in TABLES.items():
        lines += ["", f"## [{table}]", "", (cls.__doc__ or "").split("\n")[0], ""]
        lines += ["| key | default | may be | what it does |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            allowed = _CHOICES.get((cls, field.name))
            kind = _type_name(hints[field.name])
            may_be = (
                f"some of {', '.join(allowed)}"
                if isinstance(field.default, tuple)
                else (f"one of {', '.join(allowed)}" if allowed else kind)
            )
            if hints[field.name] in (int, float):
                may_be += ", not negative"
            doc = field.metadata["doc"]
            lines.append(f"| `{field.name}` | `{_toml(field.default)}` | {may_be} | {doc} |")
    lines += [
        "",
        "## [model]",
        "",
        "| key | default | may be | what it does |",
        "|---|---|---|---|",
        '| `builder` | (our CNN) | "package.module:function" | your own network, tuned like '
        "ours ([docs/builders.md](builders.md)); [space] then takes its hyperparameters and "
        "the training ones: "
        + ", ".join(f"`{name}`" for name in model.TRAINING_HYPERPARAMETERS)
        + " |",
        "",
        "## [space]",
        "",
        "Each hyperparameter a model can have is either fixed for every trial (a plain value) or",
        "searched, as one of:",
        "",
        "```toml",
        'learning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }  # or step = 0.1',
        'num_filters   = { type = "int", low = 16, high = 64, step = 16 }         # or log = true',
        'kernel_size   = { type = "categorical", choices = [3, 5] }',
        "```",
        "",
        "A searched hyperparameter can be conditional: `when` names hyperparameters searched",
        "above it and the values they must take (a value, or a list of them); in other trials",
        "it is not sampled and keeps its default:",
        "",
        "```toml",
        'weight_decay = { type = "float", low = 0, high = 0.01, when = { optimizer = "adamw" } }',
        "```",
        "",
        "Every value a range or its choices can give must be one the model takes. At least one",
        "hyperparameter must be searched; the rest keep the defaults below. A file without",
        "[space] searches a space sized for its data (src/digitune/sizing.py): convolution",
        "blocks the pictures allow, batch sizes that suit their count, batch normalisation and",
        "augmentation, with a careful hand-written configuration tried first.",
        "",
        "| hyperparameter | default | may be | what it does |",
        "|---|---|---|---|",
    ]
    for name, default in model.HYPERPARAMETER_DEFAULTS.items():
        kind, _, words = model.HYPERPARAMETER_LIMITS[name]
        may_be = " ".join(part for part in (_type_name(kind), words) if part and kind is not str)
        may_be = words if kind is str else may_be
        lines.append(
            f"| `{name}` | `{_toml(default)}` | {may_be} | {model.HYPERPARAMETER_DOCS[name]} |"
        )
    lines += [
        "",
        "The picture size and the number of classes come from [data], not from [space].",
        "",
        "## [[enqueue]]",
        "",
        "Configurations tried first, in the file's order (Optuna's `enqueue_trial`): each names",
        "values of some searched hyperparameters, within their ranges, and the sampler fills in",
        "the rest. A resumed study does not run them again.",
    ]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    """A default as a study file writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return repr(value)
