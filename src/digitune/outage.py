"""Waiting out an MLflow tracking store that does not answer, rather than failing.

A trial's tracking writes go through `persist`: when one fails and the store does not answer
(a tracking server restarting, a network gone), the trial says so in one line, asks again
every few seconds, says when the store is back, and writes what it had. An error of a store
that answers (a bad value, a refusal) is raised at once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import TypeVar

import mlflow

from digitune import config

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long MLflow itself retries a request to a tracking server before it raises: a few
# seconds (its default is about two minutes), since a trial then waits for the server itself
# (`persist`), saying so, and every command says at once that a server is down.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
# MLflow prints two links to a tracking server's UI whenever a run ends: two lines per trial
# around its own; digitune prints the study's link at its end.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# How often a trial waiting for the tracking store asks whether it answers again.
RETRY_SECONDS = 5.0
# MLflow logs an error for every background write that fails; the trial writes those again
# (`tracking.confirm_epoch_metrics`), and `persist` has said that the store is down.
logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(logging.CRITICAL)


def answers() -> bool:
    """Whether the tracking store MLflow points at answers a request now."""
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception:  # noqa: BLE001 -- whatever it raises, it does not answer.
        return False
    return True


# What this process's writes belong to, as the lines about an outage name it: its trial.
WRITER = ["this command"]


def persist(write: Callable[[], T], wait: bool = True) -> T:
    """Do the tracking write `write`, waiting out an outage: when it fails and the store does
    not answer, wait for the store, with a line when it stops answering and one when it is
    back, and write again. An error of a store that answers is raised at once, as is any
    error without `wait`; Ctrl-C twice stops the wait (KeyboardInterrupt)."""
    while True:
        try:
            return write()
        except Exception as error:
            if not wait or answers():
                raise
            _wait_for_store(WRITER[0], error)


def _why(error: Exception) -> str:
    """What went wrong in a few words: the operating system's reason when there is one."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^\"')]+)|(Connection reset by peer|timed out)", text)
    if found:
        return found.group(1) or found.group(2)
    return (text.splitlines()[0] if text else type(error).__name__)[:120]


def _wait_for_store(what: str, error: Exception) -> None:
    uri = config.redact(mlflow.get_tracking_uri())
    log.warning(
        f"MLflow does not answer at {uri} ({config.redact(_why(error))}): {what} waits for "
        f"it, asking every {RETRY_SECONDS:.0f} s, and then records what it has "
        "(Ctrl-C twice to stop)"
    )
    started = time.monotonic()
    while True:
        time.sleep(RETRY_SECONDS)
        if answers():
            break
    log.warning(f"MLflow answers again after {time.monotonic() - started:.0f} s: {what} goes on")
