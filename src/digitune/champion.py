"""@champion and its history: the compare-and-set that moves it, and rollback.

The history of every move (who, when, why, from which version) is a JSON tag on the
registered model, so `rollback` works across machines and calls. Moving the alias and
appending to the history happen under a lock held in the registry itself (`champion_lock`),
so of two promotions at once one wins and no event is lost.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import socket
import time

import mlflow

from digitune import config, registry

HISTORY_TAG = "champion_history"
# Registered-model tags hold at most a few thousand characters: keep the newest events.
HISTORY_LIMIT = 40


def history(client: mlflow.MlflowClient, model_name: str = registry.MODEL_NAME) -> list[dict]:
    """The champion's history, oldest first: who became champion when, and why."""
    tags = client.get_registered_model(model_name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


# The lock that makes moving @champion a compare-and-set: a registered model of this name,
# which the store lets one caller create (names are unique: a database constraint in SQLite
# and PostgreSQL, the same check behind a tracking server). One left behind by a killed
# process is taken over once it is this old.
LOCK_SUFFIX = ".champion-lock"
LOCK_WAIT_SECONDS = 60.0
LOCK_STALE_SECONDS = 300.0


@contextlib.contextmanager
def champion_lock(client: mlflow.MlflowClient, model_name: str = registry.MODEL_NAME):
    """Hold the lock on the model's @champion and its history for the block; waits up to
    `LOCK_WAIT_SECONDS` for another promote or rollback to finish."""
    name = model_name + LOCK_SUFFIX
    holder = f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"holder": holder},
                description="Held while digitune moves @champion; deleted when it is done.",
            )
            break
        except mlflow.exceptions.MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # Released meanwhile.
            lock = client.get_registered_model(name)
            age = time.time() - lock.creation_timestamp / 1000
            if age > LOCK_STALE_SECONDS:
                client.delete_registered_model(name)
                continue
            if time.monotonic() > deadline:
                raise registry.RegistryError(
                    f"@champion is locked by {lock.tags.get('holder', 'another process')} "
                    f"since {age:.0f} s (another promote or rollback); nothing changed. Run it "
                    f"again later, or delete the registered model '{name}' if that process is "
                    "gone"
                )
        time.sleep(0.2)
    try:
        yield
    finally:
        client.delete_registered_model(name)


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
        events = history(client, model_name)
        events.append(
            {
                "action": action,
                "version": version,
                "previous": previous,
                "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "by": getpass.getuser(),
                "reason": reason,
                **extra,
            }
        )
        client.set_registered_model_alias(model_name, config.CHAMPION_ALIAS, version)
        client.set_registered_model_tag(
            model_name, HISTORY_TAG, json.dumps(events[-HISTORY_LIMIT:])
        )


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
    registry.load_pyfunc(target)  # Refuse to roll back onto a version whose files are gone.
    move_champion(
        client,
        str(target.version),
        str(current.version),
        "rollback",
        f"rollback of version {current.version}",
        model_name,
    )
    return str(current.version), str(target.version)
