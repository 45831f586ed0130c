"""The search space: a study file's [space] as Optuna distributions, and a trial as plain params.

A [space] entry is either a plain value (fixed for every trial) or a distribution:

    learning_rate = { type = "float", low = 1e-4, high = 1e-2, log = true }
    num_filters   = { type = "int", low = 16, high = 64, step = 16 }
    kernel_size   = { type = "categorical", choices = [3, 5] }

A distribution can be conditional: `when` names hyperparameters sampled earlier in [space]
and the values they must take, and the hyperparameter is sampled only in trials where they
do (Optuna's define-by-run); elsewhere it is absent and the model takes its default:

    weight_decay  = { type = "float", low = 1e-5, high = 0.01, when = { optimizer = "adamw" } }
    filter_growth = { type = "float", low = 1.25, high = 2.0, when = { num_conv_blocks = [2, 3] } }

Every value a distribution can draw is checked against what `digitune.model` takes before
anything trains. [[enqueue]] tables name configurations worth trying first (Optuna's
`enqueue_trial`), each within its ranges; the sampler fills in the rest.

`suggest(trial, definition)` is the one place an Optuna trial becomes a plain dict.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from digitune import model

FIXED_PARAMS_ATTR = "fixed_params"
_DISTRIBUTION_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def read(
    table: object, path: Path, builder: str | None = None
) -> tuple[dict[str, optuna.distributions.BaseDistribution], dict, dict[str, dict]]:
    """A [space] table as (distributions, fixed values, conditions), in the file's order,
    of our CNN's hyperparameters or of the network `builder` names ([model]); every error
    names the file and the hyperparameter. A condition maps each hyperparameter it names to
    the tuple of values that make it hold."""
    if not isinstance(table, dict):
        raise ValueError(f"{path} [space]: expected a table")
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    fixed: dict[str, object] = {}
    conditions: dict[str, dict[str, tuple]] = {}
    known = model.hyperparameters(builder)[0]
    for name, spec in table.items():
        source = f"{path} [space] '{name}'"
        if name not in known:
            reason = (
                "set by [data]"
                if name in model.DATA_PARAMS
                else "set by [model]"
                if name == model.BUILDER_PARAM
                else f"not a hyperparameter of {builder}"
                if builder
                else "unknown hyperparameter"
            )
            raise ValueError(f"{source}: {reason}; known ones are {', '.join(known)}")
        if isinstance(spec, dict):
            if "when" in spec:
                conditions[name] = _condition(spec["when"], distributions, f"{source} 'when'")
                spec = {key: value for key, value in spec.items() if key != "when"}
            distributions[name] = _distribution(spec, source)
            _check_distribution(name, distributions[name], source, builder)
        else:
            _check_value(name, spec, source, builder)
            fixed[name] = spec
    if not distributions:
        raise ValueError(f"{path} [space]: nothing to search; give at least one distribution")
    return distributions, fixed, conditions


def _condition(table: object, earlier: dict, source: str) -> dict[str, tuple]:
    """A `when` table checked: each key a hyperparameter sampled above this one, each value
    one it can draw, or a list of them."""
    if not isinstance(table, dict) or not table:
        raise ValueError(
            f"{source}: expected a table of hyperparameters sampled above and their values, "
            'e.g. when = { optimizer = "adamw" }'
        )
    condition = {}
    for name, wanted in table.items():
        if name not in earlier:
            raise ValueError(
                f"{source}: '{name}' is not sampled above this hyperparameter in [space]; a "
                "condition names one of "
                + (", ".join(earlier) if earlier else "(none yet: put it after what it names)")
            )
        values = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        if not values:
            raise ValueError(f"{source}: '{name}' needs at least one value")
        for value in values:
            if not _within(earlier[name], value):
                raise ValueError(
                    f"{source}: '{name}' never draws {value!r} (its range is {earlier[name]!r})"
                )
        condition[name] = values
    return condition


def holds(condition: dict[str, tuple] | None, params: dict) -> bool:
    """Whether the hyperparameters drawn so far meet a condition (None: always)."""
    return condition is None or all(
        name in params and any(_same(params[name], value) for value in values)
        for name, values in condition.items()
    )


def _check_value(name: str, value: object, source: str, builder: str | None) -> None:
    problem = model.hyperparameter_problem(name, value, builder)
    if problem:
        raise ValueError(f"{source}: {problem}")


def _check_distribution(name: str, distribution, source: str, builder: str | None) -> None:
    """Every value a distribution can draw must be one the model takes: its choices, or the
    ends of its range (the limits are intervals), of the hyperparameter's type."""
    kind = model.hyperparameters(builder)[1][name][0]
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        for choice in distribution.choices:
            _check_value(name, choice, f"{source} choice {choice!r}", builder)
        return
    if kind in (bool, str):
        raise ValueError(
            f"{source}: takes {'true or false' if kind is bool else 'names'}, not a range of "
            'numbers; give { type = "categorical", choices = [...] } or a fixed value'
        )
    if kind is int and isinstance(distribution, optuna.distributions.FloatDistribution):
        raise ValueError(f'{source}: takes integers; give type = "int"')
    for end in ("low", "high"):
        _check_value(name, getattr(distribution, end), f"{source} '{end}'", builder)
    # A builder's limits may be choices rather than an interval: every integer a range
    # draws, or a float range's middle too, must be one of them.
    if isinstance(distribution, optuna.distributions.IntDistribution) and not distribution.log:
        inside = range(distribution.low, distribution.high + 1, distribution.step)
    else:
        inside = [kind((distribution.low + distribution.high) / 2)] if kind is float else []
    for value in inside[:10_000]:
        _check_value(name, value, f"{source} (it draws {value!r})", builder)


def enqueued(
    tables: object, distributions: dict, fixed: dict, path: Path, conditions: dict | None = None
) -> tuple[dict, ...]:
    """The [[enqueue]] tables, each checked against the sampled hyperparameters' ranges and
    conditions."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError(f"{path} [[enqueue]]: expected an array of tables ([[enqueue]] blocks)")
    for index, params in enumerate(tables, start=1):
        source = f"{path} [[enqueue]] #{index}"
        for name, value in params.items():
            if name in fixed:
                raise ValueError(
                    f"{source} '{name}': fixed in [space] at {fixed[name]!r}; "
                    "only sampled hyperparameters can be enqueued"
                )
            if name not in distributions:
                raise ValueError(
                    f"{source} '{name}': not a sampled hyperparameter; sampled ones are "
                    f"{', '.join(distributions)}"
                )
            if not _within(distributions[name], value):
                raise ValueError(
                    f"{source} '{name}': {value!r} is outside its [space] range "
                    f"{distributions[name]!r}"
                )
            condition = (conditions or {}).get(name)
            if not holds(condition, params):
                wanted = " and ".join(
                    f"{key} is {' or '.join(map(repr, values))}"
                    for key, values in condition.items()
                )
                raise ValueError(
                    f"{source} '{name}': sampled only when {wanted}, which this configuration "
                    "does not set; give those values too, or leave it out"
                )
    return tuple(tables)


def _within(distribution: optuna.distributions.BaseDistribution, value: object) -> bool:
    """Whether the distribution can draw `value`: Optuna's own test (range and step grid),
    after a type check of our own, since Optuna takes True for 1 and 3.0 for 3."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return any(_same(value, choice) for choice in distribution.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(distribution, optuna.distributions.IntDistribution) and value != int(value):
        return False
    return distribution._contains(distribution.to_internal_repr(value))


def _same(value: object, choice: object) -> bool:
    # TOML's true is not the choice 1, nor 3.0 the choice 3.
    return type(value) is type(choice) and value == choice


def _distribution(spec: dict, source: str) -> optuna.distributions.BaseDistribution:
    kind = spec.get("type")
    if kind not in _DISTRIBUTION_KEYS:
        raise ValueError(f"{source}: 'type' must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(spec) - _DISTRIBUTION_KEYS[kind])
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} for a {kind} range")

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{source}: 'choices' must be a non-empty list")
        return optuna.distributions.CategoricalDistribution(choices)

    number = float if kind == "float" else int
    for key in ("low", "high"):
        value = spec.get(key)
        if value is None:
            raise ValueError(f"{source}: '{key}' is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{source}: '{key}' must be a number, got {value!r}")
        if number is int and not float(value).is_integer():
            raise ValueError(f"{source}: '{key}' must be an integer, got {value!r}")
    low, high = number(spec["low"]), number(spec["high"])
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{source}: 'log' must be true or false, got {log!r}")
    step = spec.get("step")
    if low > high:
        raise ValueError(f"{source}: 'low' ({low}) is greater than 'high' ({high})")
    if log and low <= 0:
        raise ValueError(f"{source}: a log range needs 'low' > 0, got {low}")
    if log and step is not None:
        raise ValueError(f"{source}: 'step' cannot be combined with 'log'")
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < math.inf
    ):
        raise ValueError(f"{source}: 'step' must be a positive number, got {step!r}")
    if step is not None and number is int and not isinstance(step, int):
        raise ValueError(f"{source}: an int range takes a whole 'step', got {step!r}")
    if not all(math.isfinite(v) for v in (low, high)):
        raise ValueError(f"{source}: 'low' and 'high' must be finite")
    if kind == "float":
        return optuna.distributions.FloatDistribution(low, high, log=log, step=step)
    return optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)


def suggest(trial: optuna.Trial, definition) -> dict:
    """The trial's hyperparameters as a plain dict: sampled values plus the fixed ones. A
    conditional hyperparameter is sampled only when what it depends on, drawn before it,
    meets its condition."""
    sampled: dict[str, object] = {}
    for name, distribution in definition.distributions.items():
        if holds(definition.conditions.get(name), sampled):
            sampled[name] = _sample(trial, name, distribution)
    # Kept on the trial so that `params_of` rebuilds the whole dict even if the file changes.
    trial.set_user_attr(FIXED_PARAMS_ATTR, definition.fixed)
    return {**definition.fixed, **sampled}


def readable(value: object, digits: int = 3) -> str:
    """A hyperparameter's value as a person reads it in a line or a table: floats to `digits`
    significant digits (the study and the runs keep every digit)."""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def params_of(trial: optuna.trial.FrozenTrial) -> dict:
    """The whole hyperparameter dict of a finished trial, as `suggest` gave it."""
    return {**trial.user_attrs.get(FIXED_PARAMS_ATTR, {}), **trial.params}


def _sample(trial: optuna.Trial, name: str, distribution) -> object:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    if isinstance(distribution, optuna.distributions.FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    return trial.suggest_int(
        name, distribution.low, distribution.high, log=distribution.log, step=distribution.step
    )
