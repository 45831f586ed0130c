"""The tuning engines, peers over one scaffold (`scaffold`): Optuna (`optuna_search`, with its
trial function in `objective` and worker processes in `parallel`) and Keras Tuner
(`keras_tuner_search`, with the study as its hypermodel).

Every engine is a module with a `run` function that takes a study file (or its definition)
and keyword arguments `n_trials`, `timeout_minutes`, `register` and `experiment`, builds on
`scaffold` (prepare the inputs, open the parent run, log each trial with
`tracking.trial_run`, test and register the best with `registry.register_best`) and returns a
`scaffold.Outcome`. To add an engine: write such a module and name it in `module` below.
"""

from __future__ import annotations

NAMES = ("optuna", "keras-tuner")


def module(name: str):
    """The engine module `name` names. Each is imported only when asked for: Keras Tuner is
    an optional extra."""
    if name == "optuna":
        from digitune.engines import optuna_search

        return optuna_search
    if name == "keras-tuner":
        from digitune.engines import keras_tuner_search

        return keras_tuner_search
    raise ValueError(f"unknown engine {name!r}; engines are {', '.join(NAMES)}")
