"""The numerical backend under Keras: which one, started quietly, on which devices, in which
precision, and how worker processes share them.

Keras reads KERAS_BACKEND once, when it is first imported, so `choose` settles the backend
before anything imports Keras: a study file's [training] `backend`, else KERAS_BACKEND, else
TensorFlow where it is installed, else JAX. `load` imports it with the native stderr captured:
TensorFlow's CUDA build prints lines about missing drivers as it loads, noise on a CPU
machine, kept out of the terminal; but when an NVIDIA GPU is present and the backend lists
none, those lines are the cause, and `load` warns with them instead of falling back to the
CPU in silence. `describe` says what a study runs on, and why its precision.

Worker processes are spawned, not forked, and start in `spawned`: it pins the worker to its
share of the CPU threads or to its GPU, loads the backend, then unpickles and calls the
function it was handed, so that the modules the function lives in (which import Keras) load
after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from digitune import config

log = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax")
# GPUs from this compute capability on compute bfloat16 natively (NVIDIA Ampere and later).
BFLOAT16_COMPUTE_CAPABILITY = 8.0


def _not_a_retracing_hint(record: logging.LogRecord) -> bool:
    """TensorFlow warns that "N out of the last N calls ... triggered tf.function retracing"
    once a process has built several models, as every study does (each trial's `predict`
    is a new function). It is a hint for code that retraces one model, not for users."""
    return "triggered tf.function retracing" not in record.getMessage()


def setting_of(study: str | None) -> str:
    """A study file's [training] `backend`, read before Keras loads ("auto" without one);
    a missing file is an error here, before Keras takes seconds to load; the file's other
    mistakes are `study_file.load`'s to report."""
    if not study:
        return "auto"
    path = config.existing_study(study)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
        value = document.get("training", {}).get("backend", "auto")
    except (OSError, ValueError, AttributeError):
        return "auto"
    return value if value in config.BACKENDS else "auto"


def installed(name: str) -> bool:
    """Whether a backend's package can be imported here."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve(setting: str = "auto") -> str:
    """The backend a [training] `backend` setting stands for here."""
    return resolved(setting)[0]


def resolved(setting: str = "auto") -> tuple[str, str]:
    """The backend a [training] `backend` setting stands for here, and why."""
    if setting in BACKENDS:
        return setting, "the study file's [training] backend"
    if setting != "auto":
        raise ValueError(f"backend must be auto, {' or '.join(BACKENDS)}, got {setting!r}")
    named = config.keras_backend()
    if named is not None:
        return named, "KERAS_BACKEND"
    for name in BACKENDS:
        if installed(name):
            return name, "installed here" + (", TensorFlow not" if name == "jax" else "")
    raise ValueError(
        "neither TensorFlow nor JAX is installed: pip install digitune (TensorFlow), or "
        "'digitune[jax]' (JAX on the CPU) or 'digitune[jax-cuda]' (JAX on NVIDIA GPUs)"
    )


def choose(setting: str = "auto") -> str:
    """Settle the backend for this process and the workers it starts, before Keras loads."""
    name = resolve(setting)
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise ValueError(
                f"the study asks for the {name} backend, but Keras was loaded with "
                f"{keras.backend.backend()} in this process; set KERAS_BACKEND={name} before "
                "starting it"
            )
    os.environ["KERAS_BACKEND"] = name
    if name == "jax":
        # Workers that share a GPU take its memory as they need it, not three quarters each.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return name


def load(name: str | None = None) -> str:
    """Import the chosen backend (once) with its native start-up lines captured; warn, with
    them, when an NVIDIA GPU is present that the backend cannot use. Returns its name."""
    name = name or choose()
    logging.getLogger("tensorflow").addFilter(_not_a_retracing_hint)
    if name in sys.modules:
        return name
    with native_stderr_captured() as captured:
        if name == "tensorflow":
            import tensorflow  # noqa: F401
        else:
            import jax

            cache = config.compilation_cache_dir()
            if cache is not None:
                # Trials of one study compile the same few networks again and again. (A JAX
                # without these options compiles every time, and still trains.)
                with contextlib.suppress(AttributeError, ValueError, KeyError):
                    jax.config.update("jax_compilation_cache_dir", str(cache))
                    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    present = nvidia_gpus()
    if present and not [device for device in devices(name) if device.kind == "gpu"]:
        cause = "\n  ".join(line for line in captured.lines() if line.strip())[-2000:]
        log.warning(
            "%s GPU(s) present (%s), but %s sees none: trials run on the CPU. %s%s",
            len(present),
            present[0],
            name,
            "TensorFlow needs its CUDA build (pip install 'digitune[gpu]'); JAX its CUDA "
            "plugin (pip install 'digitune[jax-cuda]'). ",
            f"What {name} said as it loaded:\n  {cause}" if cause else "",
        )
    return name


@dataclasses.dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "gpu"
    name: str  # "NVIDIA H200", or the processor's
    compute_capability: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def devices(name: str | None = None) -> list[Device]:
    """The devices the loaded backend computes on, GPUs first."""
    name = name or config.keras_backend() or "tensorflow"
    found = []
    if name == "jax":
        import jax

        for device in jax.devices():
            if device.platform not in ("gpu", "cuda", "rocm"):
                found.append(Device("cpu", processor()))
                continue
            capability = float(getattr(device, "compute_capability", 0) or 0)
            found.append(Device("gpu", device.device_kind, capability))
    else:
        import tensorflow as tf

        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            major, minor = details.get("compute_capability", (0, 0))
            found.append(Device("gpu", details.get("device_name", device.name), major + minor / 10))
        if not found:
            found.append(Device("cpu", processor()))
    return sorted(found, key=lambda device: device.kind != "gpu")


def processor() -> str:
    """This machine's processor, as /proc/cpuinfo names it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"


def nvidia_gpus() -> list[str]:
    """The NVIDIA GPUs this machine has, as `nvidia-smi -L` lists them ([] without)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split(" (UUID")[0] for line in listed.stdout.splitlines() if line.strip()]


def precision(setting: str, name: str | None = None) -> tuple[str, str]:
    """The Keras dtype policy a `precision` setting stands for here, and why."""
    if setting != "auto":
        return setting, "set in the study file"
    forced = config.forced_precision()
    if forced is not None:
        return forced, "DIGITUNE_PRECISION"
    gpus = [device for device in devices(name) if device.kind == "gpu"]
    if gpus and gpus[0].compute_capability >= BFLOAT16_COMPUTE_CAPABILITY:
        return "mixed_bfloat16", "a GPU with bfloat16 (no loss scaling needed)"
    if gpus:
        return "mixed_float16", "a GPU without bfloat16"
    if (name or config.keras_backend()) == "jax":
        return "float32", "XLA on a CPU"
    if config.cpu_has_bfloat16():
        return "mixed_bfloat16", "a CPU with bfloat16 instructions"
    return "float32", "a CPU without bfloat16 instructions"


def describe(precision_setting: str = "auto") -> dict[str, str]:
    """What a study runs on: backend and version, devices, and the precision with why."""
    name = config.keras_backend() or "tensorflow"
    module = sys.modules.get(name)
    policy, why = precision(precision_setting, name)
    return {
        "backend": f"{name} {getattr(module, '__version__', '')}".strip(),
        "devices": ", ".join(str(device) for device in devices(name)),
        "precision": policy,
        "precision_why": why,
    }


def worker_setup(index: int, workers: int, gpus: int, threads: int) -> dict[str, str]:
    """The environment of worker `index` of `workers`: one of `gpus` GPUs each, in turn
    (several workers share one when there are more workers than GPUs), or an equal share of
    the CPU threads."""
    if gpus:
        return {"CUDA_VISIBLE_DEVICES": str(index % gpus)}
    return {
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": str(threads),
        # XLA's CPU client, for JAX.
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}",
    }


def spawn_call(function, *arguments, environment: dict[str, str] | None = None) -> tuple:
    """The `target` and `args` of a spawned process (or a pool's initializer and initargs)
    that calls `function(*arguments)` once the backend has loaded, in `environment`."""
    return spawned, (pickle.dumps((function, arguments)), environment or {})


def spawned(call: bytes, environment: dict[str, str]) -> None:
    """Where a spawned process starts: its environment, the backend, then the call."""
    os.environ.update(environment)
    name = load()
    if name == "tensorflow" and "TF_NUM_INTRAOP_THREADS" in environment:
        import tensorflow as tf

        threads = int(environment["TF_NUM_INTRAOP_THREADS"])
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    function, arguments = pickle.loads(call)
    function(*arguments)


@dataclasses.dataclass
class Captured:
    """What native code printed to file descriptor 2 in a `native_stderr_captured` block."""

    text: str = ""

    def lines(self) -> list[str]:
        return self.text.splitlines()


@contextlib.contextmanager
def native_stderr_captured():
    """File descriptor 2 pointed at a temporary file for the block, read back afterwards:
    for native code that prints to it directly (a backend loading, the TFLite converter's
    "fully_quantize: ..." line)."""
    sys.stderr.flush()
    captured = Captured()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+", errors="replace") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read()
