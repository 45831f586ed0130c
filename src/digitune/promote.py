"""Promote the challenger to champion on evidence, through MLflow registry aliases.

`digitune promote [--model NAME]` evaluates `NAME@challenger` and `NAME@champion` (`mnist-cnn`
by default) on the same full test set of the challenger's dataset (MNIST's by default) with
the same preprocessing, and moves `@champion` only when the challenger is
better by at least `--margin` (default: any improvement), or when there is no champion yet.
Both accuracies, per-class accuracy, the images each gets right that the other gets wrong and
an exact McNemar p-value are printed and kept as tags on both versions. `--force` promotes
anyway and records that it was forced. `digitune rollback` undoes a promotion.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from digitune import champion, config, data, datasets, evaluate, registry, tracking


@dataclasses.dataclass(frozen=True)
class Decision:
    """What `promote` concluded and why."""

    challenger: str
    champion: str | None
    comparison: evaluate.Comparison | None
    challenger_evaluation: evaluate.Evaluation
    promoted: bool
    forced: bool
    reason: str


def promote(
    margin: float = 0.0, force: bool = False, model_name: str = registry.MODEL_NAME
) -> Decision:
    """Compare challenger and champion on the test set of the challenger's dataset and move
    @champion if warranted."""
    if margin < 0:
        raise ValueError(f"--margin must not be negative, got {margin}")
    client = tracking.configure()
    challenger = registry.version_by_alias(client, config.CHALLENGER_ALIAS, model_name=model_name)
    current = registry.version_by_alias(
        client, config.CHAMPION_ALIAS, required=False, model_name=model_name
    )
    # MLflow hands versions back as numbers or strings depending on the call; compare strings.
    challenger_version = str(challenger.version)
    champion_version = str(current.version) if current is not None else None
    if champion_version == challenger_version:
        raise registry.RegistryError(
            f"version {challenger_version} is already @champion; "
            "run `make tune` for a new challenger"
        )
    dataset = datasets.from_spec(challenger.tags.get("data_spec"))
    images, labels = data.preprocess(dataset.test_images), dataset.test_labels.astype(int)
    # Both models load before any alias moves, so missing files change nothing; with
    # `force`, a champion that cannot be loaded is replaced all the same.
    challenger_model = registry.load_pyfunc(challenger)
    champion_model, unloadable = None, None
    if current is not None:
        try:
            champion_model = registry.load_pyfunc(current)
        except registry.RegistryError as error:
            if not force:
                raise registry.RegistryError(
                    f"{error}; the champion cannot be compared (--force replaces it anyway)"
                ) from None
            unloadable = str(error)
    challenger_probabilities = challenger_model.predict(images)

    if champion_model is None:
        comparison = None
        evaluation = evaluate.from_probabilities(
            challenger_probabilities, labels, dataset.class_names
        )
        better = current is None
        reason = (
            "there was no champion yet"
            if current is None
            else f"the champion, version {champion_version}, could not be loaded: {unloadable}"
        )
    else:
        comparison = evaluate.compare(
            challenger_probabilities, champion_model.predict(images), labels, dataset.class_names
        )
        evaluation = comparison.first
        gain = comparison.first.accuracy - comparison.second.accuracy
        better = gain > 0 and gain >= margin
        reason = (
            f"test accuracy {comparison.first.accuracy:.4f} vs {comparison.second.accuracy:.4f} "
            f"({gain * 100:+.2f} points, required more than 0 and at least {margin * 100:.2f}; "
            f"McNemar p = {comparison.p_value:.3g})"
        )
    promoted = better or force
    forced = force and not better
    if promoted:
        # Moves @champion only if it is still the version compared against.
        champion.move_champion(
            client,
            challenger_version,
            champion_version,
            "promote",
            ("FORCED: " if forced else "") + reason,
            model_name,
            forced=forced,
            test_accuracy=round(evaluation.accuracy, 6),
        )
    decision = Decision(
        challenger_version, champion_version, comparison, evaluation, promoted, forced, reason
    )
    _tag(client, model_name, decision)
    return decision


def _tag(client, model_name: str, outcome: Decision) -> None:
    """Both versions' tags: the decision, both accuracies and the McNemar test."""
    challenger_version, champion_version = outcome.challenger, outcome.champion
    comparison, evaluation = outcome.comparison, outcome.challenger_evaluation
    forced, promoted = outcome.forced, outcome.promoted
    decision = "forced" if forced else "promoted" if promoted else "refused"
    tags = {"promotion.decision": decision, "promotion.test_accuracy": f"{evaluation.accuracy:.4f}"}
    if comparison is None:
        _set_tags(client, model_name, challenger_version, tags)
        return
    shared = {"promotion.mcnemar_p_value": f"{comparison.p_value:.4g}"}
    _set_tags(
        client,
        model_name,
        challenger_version,
        {
            **tags,
            **shared,
            "promotion.compared_with": champion_version,
            "promotion.other_test_accuracy": f"{comparison.second.accuracy:.4f}",
            "promotion.only_this_right": str(comparison.only_first_right),
            "promotion.only_other_right": str(comparison.only_second_right),
        },
    )
    _set_tags(
        client,
        model_name,
        champion_version,
        {
            **shared,
            "promotion.decision": f"challenged by version {challenger_version}: {decision}",
            "promotion.test_accuracy": f"{comparison.second.accuracy:.4f}",
            "promotion.compared_with": challenger_version,
            "promotion.other_test_accuracy": f"{comparison.first.accuracy:.4f}",
            "promotion.only_this_right": str(comparison.only_second_right),
            "promotion.only_other_right": str(comparison.only_first_right),
        },
    )


def _set_tags(client, model_name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)


def table(decision: Decision) -> pd.DataFrame:
    """The comparison a person reads before trusting the decision."""
    columns = {f"challenger (v{decision.challenger})": decision.challenger_evaluation}
    if decision.comparison is not None:
        columns[f"champion (v{decision.champion})"] = decision.comparison.second
    rows = {"test accuracy": {name: f"{e.accuracy:.4f}" for name, e in columns.items()}}
    names = decision.challenger_evaluation.class_names
    kind = "digit" if names == evaluate.DIGITS else "class"
    for index, class_name in enumerate(names):
        rows[f"  {kind} {class_name}"] = {
            name: f"{e.per_class_accuracy[index]:.4f}" for name, e in columns.items()
        }
    if decision.comparison is not None:
        comparison = decision.comparison
        names = list(columns)
        rows["right where the other is wrong"] = {
            names[0]: str(comparison.only_first_right),
            names[1]: str(comparison.only_second_right),
        }
        rows["McNemar exact p-value"] = {names[0]: f"{comparison.p_value:.4g}", names[1]: ""}
    return pd.DataFrame(rows).T
