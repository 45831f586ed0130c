"""Start-up without native noise, in the command and in its worker processes.

TensorFlow's CUDA build prints lines about missing drivers and oneDNN to the process's native
stderr as it loads, before its own log level applies. They are noise on a CPU machine, so
TensorFlow is first imported with file descriptor 2 pointed at /dev/null. A failed import
still raises, and its Python error shows as usual.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import sys


def _not_a_retracing_hint(record: logging.LogRecord) -> bool:
    """TensorFlow warns that "N out of the last N calls ... triggered tf.function retracing"
    once a process has built several models, as every study does (each trial's `predict`
    is a new function). It is a hint for code that retraces one model, not for users."""
    return "triggered tf.function retracing" not in record.getMessage()


def import_tensorflow() -> None:
    """Import TensorFlow (once) with the native stderr closed, and without its retracing
    hints."""
    logging.getLogger("tensorflow").addFilter(_not_a_retracing_hint)
    if "tensorflow" in sys.modules:
        return
    with native_stderr_closed():
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def native_stderr_closed():
    """File descriptor 2 pointed at /dev/null for the block: for native code that prints
    to it directly (TensorFlow loading, the TFLite converter's "fully_quantize: ..." line)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def call(module: str, function: str, arguments: bytes) -> None:
    """The target of a spawned process: import TensorFlow quietly, then call
    `module.function(*arguments)`. The arguments travel pickled, because unpickling them
    imports the modules that load TensorFlow."""
    import_tensorflow()
    target = getattr(importlib.import_module(module), function)
    target(*pickle.loads(arguments))
