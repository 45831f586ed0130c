"""Promotion: move @champion on evidence, keep its history, roll it back.

`digitune promote [--model NAME]` evaluates `NAME@challenger` and `NAME@champion` (`mnist-cnn`
by default) on the same full test set of the challenger's dataset (MNIST's by default) with
the same preprocessing, and moves `@champion` only when the challenger is
better by at least `--margin` (default: any improvement), or when there is no champion yet.
Both accuracies, per-class accuracy, the images each gets right that the other gets wrong and
an exact McNemar p-value are printed and kept as tags on both versions. `--force` promotes
anyway and records that it was forced. `digitune rollback` undoes a promotion.

The history of every move (who, when, why, from which version) is kept in the registered
model's tags, one JSON tag per move, so `rollback` works across machines and calls. Moving
the alias and recording the move happen under a lock held in the registry itself
(`champion_lock`, one of `locks`), so of two promotions at once one wins and no event is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import getpass
import json

import mlflow
import pandas as pd

from digitune import config, data, evaluate, loader, locks, registry, tracking


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


def _difference_from_champion(champion, challenger, dataset: data.Dataset) -> str | None:
    """Why `challenger` (whose test set is `dataset`'s) cannot be compared with `champion`,
    from the champion's own tags rather than the challenger's: None when it can."""
    difference = registry.task_difference(registry.task_of(champion), registry.task_of(challenger))
    if difference is not None:
        return difference
    if tuple(dataset.class_names) != registry.task_of(champion)[1]:
        return f"its test set's classes are not the champion's ({dataset.name} as loaded now)"
    expected = champion.tags.get("test_sha256")
    if expected and expected != dataset.test_digest:
        return (
            f"its test set (SHA-256 {dataset.test_digest[:12]}) is not the champion's "
            f"({expected[:12]}): other [data] settings or other pictures held out"
        )
    return None


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
    dataset = data.from_spec(challenger.tags.get("data_spec"))
    if current is not None:
        difference = _difference_from_champion(current, challenger, dataset)
        if difference is not None:  # Not even --force: the two answer different questions.
            raise registry.RegistryError(
                f"version {challenger_version} cannot replace the champion of '{model_name}', "
                f"version {champion_version}: {difference}. Nothing changed; register it under "
                "a model of its own ([registry] model_name)"
            )
    images, labels = data.preprocess(dataset.test_images), dataset.test_labels.astype(int)
    # Both models load before any alias moves, so missing files change nothing; with
    # `force`, a champion that cannot be loaded is replaced all the same.
    challenger_model = loader.load(challenger)
    champion_model, unloadable = None, None
    if current is not None:
        try:
            champion_model = loader.load(current)
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
            challenger_probabilities,
            champion_model.predict(images),
            labels,
            dataset.class_names,
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
        move_champion(
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
    kind = "digit" if names == data.DIGITS else "class"
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


# The champion's history: one registered-model tag per move, `champion_history.000007`, and,
# before them, the moves that digitune 0.x kept as one list in the tag `champion_history`.
HISTORY_TAG = "champion_history"
# What a registered-model tag holds in MLflow's SQL stores (a VARCHAR(5000) column, which
# PostgreSQL enforces and SQLite does not): an event's reason is cut to fit.
TAG_CHARACTERS = 5000


def history(client: mlflow.MlflowClient, model_name: str = registry.MODEL_NAME) -> list[dict]:
    """The champion's history, oldest first: who became champion when, and why."""
    tags = client.get_registered_model(model_name).tags
    events = json.loads(tags.get(HISTORY_TAG, "[]"))
    numbered = sorted(key for key in tags if key.startswith(f"{HISTORY_TAG}."))
    return events + [json.loads(tags[key]) for key in numbered]


def _event_text(event: dict) -> str:
    """An event as its tag holds it: JSON within TAG_CHARACTERS, its reason cut if need be."""
    text = json.dumps(event)
    over = len(text) - TAG_CHARACTERS
    if over > 0:
        reason = event["reason"]
        text = json.dumps({**event, "reason": reason[: max(0, len(reason) - over - 40)] + " ..."})
    return text


# The lock that makes moving @champion a compare-and-set (`locks`).
LOCK_SUFFIX = ".champion-lock"
LOCK_WAIT_SECONDS = 60.0


@contextlib.contextmanager
def champion_lock(client: mlflow.MlflowClient, model_name: str = registry.MODEL_NAME):
    """Hold the lock on the model's @champion and its history for the block; waits up to
    `LOCK_WAIT_SECONDS` for another promote or rollback to finish."""
    what = "@champion"
    try:
        with locks.held(client, model_name + LOCK_SUFFIX, what, LOCK_WAIT_SECONDS):
            yield
    except locks.LockedError as error:
        raise registry.RegistryError(str(error)) from None


def move_champion(
    client,
    version: str,
    previous: str | None,
    action: str,
    reason: str,
    model_name: str = registry.MODEL_NAME,
    **extra,
):
    """Point @champion at `version` and record the move in the registered model's tags, only
    if @champion still is `previous` (None: no champion): a compare-and-set under the
    champion lock, so two promotions never both win and no history event is lost."""
    with champion_lock(client, model_name):
        current = registry.version_by_alias(
            client, config.CHAMPION_ALIAS, required=False, model_name=model_name
        )
        current_version = str(current.version) if current is not None else None
        if current_version != previous:
            raise registry.RegistryError(
                f"@champion moved to version {current_version} (it was {previous} when this "
                f"{action} started); nothing changed. Run it again to compare with the new "
                "champion"
            )
        event = {
            "action": action,
            "version": version,
            "previous": previous,
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "by": getpass.getuser(),
            "reason": reason,
            **extra,
        }
        # The event first: an alias never moves without its record. Should the move fail,
        # the record goes again.
        key = f"{HISTORY_TAG}.{len(history(client, model_name)):06d}"
        client.set_registered_model_tag(model_name, key, _event_text(event))
        try:
            client.set_registered_model_alias(model_name, config.CHAMPION_ALIAS, version)
        except BaseException:
            with contextlib.suppress(Exception):
                client.delete_registered_model_tag(model_name, key)
            raise


def champion_stack(events: list[dict]) -> list[str]:
    """Replay the history: promotions push a version, rollbacks pop one."""
    stack: list[str] = []
    for event in events:
        if event["action"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(event["version"])
    return stack


def rollback(client: mlflow.MlflowClient, model_name: str = registry.MODEL_NAME) -> tuple[str, str]:
    """Move @champion back to the previous champion; returns (from, to) versions."""
    current = registry.version_by_alias(client, config.CHAMPION_ALIAS, model_name=model_name)
    stack = champion_stack(history(client, model_name))
    if len(stack) < 2 or stack[-1] != str(current.version):
        raise registry.RegistryError(
            f"no previous champion to roll back to (the history holds {stack or 'nothing'}, "
            f"@champion is version {current.version})"
        )
    target = client.get_model_version(model_name, stack[-2])
    loader.load(target)  # Refuse to roll back onto a version that is gone or unsafe.
    move_champion(
        client,
        str(target.version),
        str(current.version),
        "rollback",
        f"rollback of version {current.version}",
        model_name,
    )
    return str(current.version), str(target.version)
