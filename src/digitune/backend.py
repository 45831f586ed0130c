"""The numerical backend under Keras, started without native noise, here and in worker processes.

TensorFlow's CUDA build prints lines about missing drivers and oneDNN to the process's native
stderr as it loads, before its own log level applies. They are noise on a CPU machine, so
TensorFlow is first imported with file descriptor 2 pointed at /dev/null. A failed import
still raises, and its Python error shows as usual.

Worker processes are spawned, not forked, and start in `spawned`: it imports the backend
quietly first, then unpickles and calls the function it was handed, so that the modules the
function lives in (which import Keras) load after it.
"""

from __future__ import annotations

import contextlib
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


def spawn_call(function, *arguments) -> tuple:
    """The `target` and `args` of a spawned process (or a pool's initializer and initargs)
    that calls `function(*arguments)` once the backend has loaded quietly."""
    return spawned, (pickle.dumps((function, arguments)),)


def spawned(call: bytes) -> None:
    """Where a spawned process starts: the backend first, quietly, then the call. The call
    travels pickled because unpickling it imports the modules that load Keras."""
    import_tensorflow()
    function, arguments = pickle.loads(call)
    function(*arguments)
