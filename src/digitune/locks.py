"""Locks held in the MLflow model registry, which every process of a study shares, on any
machine: moving @champion (`promotion`) and registering a trial (`registry`).

A lock is a registered model of its own name, which the store lets one caller create (names
are unique: a database constraint in SQLite and PostgreSQL, the same check behind a tracking
server). Its holder counts in its tag `beat` while it holds it; one whose count has not moved
for STALE_SECONDS, as a waiter sees it on its own clock (no two machines' clocks are
compared), was left by a killed process and is taken over by renaming it, which only one
waiter can do.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import threading
import time
import uuid

import mlflow

STALE_SECONDS = 20.0
BEAT_SECONDS = 2.0


class LockedError(RuntimeError):
    """Another process held the lock for longer than this one would wait."""


@contextlib.contextmanager
def held(client: mlflow.MlflowClient, name: str, what: str, wait_seconds: float = 60.0):
    """Hold the lock `name` for the block, waiting up to `wait_seconds` for its holder;
    `what` says in words what it guards, for the error a waiter gives up with."""
    holder = f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_seconds
    seen, seen_since = None, time.monotonic()
    while True:
        try:
            client.create_registered_model(
                name,
                tags={"holder": holder, "token": token, "beat": "0"},
                description=f"Held by digitune while it changes {what}; deleted when it is done.",
            )
            break
        except mlflow.exceptions.MlflowException as error:
            # The store reports a taken name by looking the holder up, which finds nothing
            # when the holder released the lock in between: contended all the same.
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # Released meanwhile.
            lock = client.get_registered_model(name)
            state = (lock.tags.get("token"), lock.tags.get("beat"))
            if state != seen:
                seen, seen_since = state, time.monotonic()
            elif time.monotonic() - seen_since > STALE_SECONDS:
                _take_over(client, name, state[0])
                continue
            if time.monotonic() > deadline:
                raise LockedError(
                    f"{what} is locked by {lock.tags.get('holder', 'another process')}; "
                    f"nothing changed. Run it again later, or delete the registered model "
                    f"'{name}' if that process is gone"
                )
        time.sleep(0.2)
    beating = threading.Event()
    beat = threading.Thread(target=_beat, args=(client, name, beating), daemon=True)
    beat.start()
    try:
        yield
    finally:
        beating.set()
        beat.join()
        release(client, name, token)


def _beat(client: mlflow.MlflowClient, name: str, done: threading.Event) -> None:
    """Count in the lock's tag `beat` until `done`: its holder is alive."""
    count = 0
    while not done.wait(BEAT_SECONDS):
        count += 1
        with contextlib.suppress(Exception):  # The store's hiccup is the waiters' to judge.
            client.set_registered_model_tag(name, "beat", str(count))


def _take_over(client: mlflow.MlflowClient, name: str, token: str | None) -> None:
    """Move a stale lock out of the way by renaming it after its token: of two waiters that
    both found it stale, the second finds the new name taken (or the lock gone) and waits
    again, so it can never remove the lock the first has taken meanwhile. The renamed one
    stays, as the record of a takeover."""
    taken = f"{name}.stale-{token}"
    try:
        client.rename_registered_model(name, taken)
    except mlflow.exceptions.MlflowException:
        return  # Another waiter took it over first.
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.update_registered_model(
            taken,
            "A lock whose holder stopped (killed?), taken over by another process. Safe to delete.",
        )


def release(client: mlflow.MlflowClient, name: str, token: str) -> None:
    """Delete the lock if it is still this holder's (a waiter may have taken it over)."""
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        if client.get_registered_model(name).tags.get("token") == token:
            client.delete_registered_model(name)
