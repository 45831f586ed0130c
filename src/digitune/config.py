"""Paths, environment-driven settings and the typed defaults of a study.

This is the only module that reads environment variables. Everything that can be set in a
study file has its default here, in `StudySettings` and `TrainingSettings`; a study file
(`studies/*.toml`) is a short list of differences from these defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from pathlib import Path

REGISTERED_MODEL_NAME = "mnist-cnn"
CHALLENGER_ALIAS = "challenger"
CHAMPION_ALIAS = "champion"

# The metric that trials report, prune on and are ranked by; every study maximises it.
OBJECTIVE_METRIC = "val_accuracy"
# What a deployed model costs, measured on every completed trial of a study with an
# [objectives] table (`digitune.costs`): its weights (exact), its int8 TFLite file in KB
# (exact) and the median latency of one image through the served form, single-threaded.
COSTS = ("params", "int8_kb", "latency_ms")


def project_dir() -> Path:
    """The folder holding studies/, mlruns/ and data/: DIGITUNE_HOME, or the working directory."""
    return Path(os.environ.get("DIGITUNE_HOME") or Path.cwd()).resolve()


@contextlib.contextmanager
def project_at(folder: str | Path):
    """The project folder moved to `folder` for the block, with its own MLflow store, in this
    process and those it starts; as it was afterwards."""
    saved = {key: os.environ.get(key) for key in ("DIGITUNE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["DIGITUNE_HOME"] = str(folder)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield Path(folder)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def studies_dir() -> Path:
    return project_dir() / "studies"


# The study `digitune tune` runs when none is named.
DEFAULT_STUDY = "mnist-cnn"


def default_study_file() -> Path:
    return study_path(DEFAULT_STUDY)


def shipped_studies() -> Path:
    """The study files that ship inside the package (the repository's studies/)."""
    return Path(__file__).parent / "studies"


def study_path(value: str | Path) -> Path:
    """The study file `value` names: a path, else the name of a study in the project's
    studies/, else of one shipped with digitune (`quick`, `full`, ...)."""
    path = Path(value)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    for folder in (studies_dir(), shipped_studies()):
        if (folder / f"{value}.toml").is_file():
            return folder / f"{value}.toml"
    return path


def existing_study(value: str | Path) -> Path:
    """`study_path(value)`, or a ValueError naming the studies shipped with digitune when no
    such file exists."""
    path = study_path(value)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in shipped_studies().glob("*.toml")))
        raise ValueError(
            f"{path}: study file not found; name a file, or one of the studies shipped with "
            f"digitune ({shipped}); `digitune init` copies them into studies/ to edit"
        )
    return path


def copy_shipped_studies() -> tuple[list[Path], list[str]]:
    """Copy the shipped study files into the project's studies/, keeping any already there.
    Returns the files written and the names kept."""
    studies_dir().mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for source in sorted(shipped_studies().glob("*.toml")):
        target = studies_dir() / source.name
        if target.exists():
            kept.append(source.name)
            continue
        target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
        copied.append(target)
    return copied, kept


def data_cache_dir() -> Path:
    """Where downloaded MNIST files are cached."""
    return project_dir() / "data" / "mnist"


def mnist_dir() -> Path | None:
    """A folder named by MNIST_DIR that already holds the MNIST files, or None."""
    value = os.environ.get("MNIST_DIR")
    return Path(value).expanduser().resolve() if value else None


def mlruns_dir() -> Path:
    return project_dir() / "mlruns"


def local_tracking_uri() -> str:
    """The default MLflow store: an SQLite database inside mlruns/."""
    return f"sqlite:///{mlruns_dir() / 'mlflow.db'}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the local store inside mlruns/."""
    return os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()


def artifact_location(experiment_name: str) -> str | None:
    """Where a new experiment keeps its artifacts: mlruns/artifacts/<experiment> for the local
    store, None (the server decides) for any other tracking URI. (MLflow exports
    MLFLOW_TRACKING_URI once a URI is set, so the URI is compared, not the variable.)"""
    if tracking_uri() != local_tracking_uri():
        return None
    return (mlruns_dir() / "artifacts" / experiment_name).as_uri()


def default_storage(study_name: str) -> str:
    """The Optuna storage of a study when none is given: an SQLite file under studies/."""
    return f"sqlite:///{studies_dir() / (study_name + '.db')}"


def dataset_mirror() -> str | None:
    """DIGITUNE_DATASET_MIRROR: a base URL serving the known datasets' published files in
    place of their publishers' (a local mirror; the checksums are still the published ones)."""
    return os.environ.get("DIGITUNE_DATASET_MIRROR") or None


def storage_url() -> str | None:
    """DIGITUNE_STORAGE: the Optuna storage URL when `--storage` is not given. The Makefile
    hands STORAGE over this way, so that a password in it never shows in a command line."""
    return os.environ.get("DIGITUNE_STORAGE") or None


def reload_token() -> str | None:
    """The token `POST /reload` of `digitune serve` asks for (DIGITUNE_RELOAD_TOKEN), or None:
    then it is only rate-limited."""
    return os.environ.get("DIGITUNE_RELOAD_TOKEN") or None


def mlflow_admin_password_length() -> int:
    """The length of MLFLOW_AUTH_ADMIN_PASSWORD (0 when unset): MLflow's basic-auth app
    creates its admin user with it on the first start (never from a command line), and
    refuses one under 12 characters."""
    return len(os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or "")


def mlflow_secret_key_given() -> bool:
    """Whether MLFLOW_FLASK_SERVER_SECRET_KEY is set: the key MLflow's basic-auth app signs
    its CSRF tokens with, the same on every server of one store."""
    return bool(os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"))


def s3_endpoint_url() -> str | None:
    """MLFLOW_S3_ENDPOINT_URL (MLflow's own variable): an S3-compatible store such as MinIO
    in place of AWS, for `digitune mlflow-server --artifacts-destination s3://...`."""
    return os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def mlflow_allowed_hosts() -> str | None:
    """MLFLOW_SERVER_ALLOWED_HOSTS (MLflow's own variable) when it is set: then it alone says
    which Host headers the tracking server answers."""
    return os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS") or None


def mlflow_allowed_origins() -> str | None:
    """MLFLOW_SERVER_CORS_ALLOWED_ORIGINS (MLflow's own variable) when it is set: then it
    alone says which pages may change what the tracking server holds."""
    return os.environ.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS") or None


def backend_store_uri() -> str:
    """MLFLOW_BACKEND_STORE_URI (MLflow's own variable for its server's store), else the
    local store inside mlruns/."""
    return os.environ.get("MLFLOW_BACKEND_STORE_URI") or local_tracking_uri()


# user:password@ in any URL. The password may hold '@' and spaces, though not '/' or a line
# break; `host:5000 ...` is a port, not a password.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):(?!\d+(?:[\s/]|$))[^/\n]*@"
)
# A token alone before the @ of an HTTP URL (https://TOKEN@host): in HTTP the user part is a
# credential, while a database URL's names a role (postgresql://postgres@host stays).
_URL_TOKEN = re.compile(r"(?P<head>\bhttps?://)[^\s/:@]+@", re.IGNORECASE)
# password=... of a connection string, quoted (libpq's password='a b') or up to a space or &.
_PARAMETER_PASSWORD = re.compile(
    r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&]+)",
    re.IGNORECASE,
)
REDACTED = "***"


def redact(text: str) -> str:
    """`text` with every password in a URL or connection string replaced by ***: for every
    line, message, tag and HTTP answer that may quote a storage URL or tracking URI."""
    text = _URL_PASSWORD.sub(lambda match: f"{match['head']}:{REDACTED}@", str(text))
    text = _URL_TOKEN.sub(lambda match: f"{match['head']}{REDACTED}@", text)
    return _PARAMETER_PASSWORD.sub(lambda match: f"{match['head']}{REDACTED}", text)


def redact_every_log_record() -> None:
    """Redact each log record this process makes, whoever logs it and whichever handler
    prints it: MLflow's errors quote `http://user:pw@host`, and Optuna's failed-trial warning
    carries the error's traceback. Idempotent."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacted_record(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatters print exc_text when it is set: the traceback, redacted once here.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    redacted_record.redacts = True
    logging.setLogRecordFactory(redacted_record)


def forced_precision() -> str | None:
    """DIGITUNE_PRECISION: the Keras dtype policy that `precision = "auto"` stands for on
    every machine, or None to choose by hardware. It lets a float32-only CPU run the suite in
    bfloat16 (emulated, several times slower), as CI meets it on bfloat16 machines."""
    value = os.environ.get("DIGITUNE_PRECISION") or None
    if value is not None and value not in PRECISIONS[1:]:
        raise ValueError(
            f"DIGITUNE_PRECISION must be one of {', '.join(PRECISIONS[1:])}, got {value!r}"
        )
    return value


def keras_backend() -> str | None:
    """KERAS_BACKEND, Keras's own variable for its backend, when it is set; None otherwise."""
    value = os.environ.get("KERAS_BACKEND") or None
    if value is not None and value not in ("tensorflow", "jax"):
        raise ValueError(f"KERAS_BACKEND must be tensorflow or jax for digitune, got {value!r}")
    return value


def compilation_cache_dir() -> Path | None:
    """Where JAX keeps compiled programs between processes and runs: DIGITUNE_COMPILE_CACHE
    ("" turns the cache off), else ~/.cache/digitune/jax."""
    value = os.environ.get("DIGITUNE_COMPILE_CACHE")
    if value == "":
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "digitune" / "jax"


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def setting(default, doc: str):
    """A study-file key's default, and what it means in words (docs/study-files.md)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """The [study] table of a study file: what is searched, how, and for how long."""

    name: str = setting(
        "mnist-cnn",
        "names the study's Optuna database (studies/<name>.db), MLflow experiment and parent "
        "run; letters, digits, '-', '_' and '.'",
    )
    n_trials: int = setting(
        20,
        "the study's total of finished trials, every worker's: a resumed study runs only the "
        "rest, and a trial whose worker died is replaced by its retry; not given, with a "
        "timeout, on data other than MNIST: until the time is up",
    )
    timeout_minutes: float = setting(
        0.0, "wall-clock limit of one `tune` run, whichever of the two comes first (0: none)"
    )
    sampler: str = setting("tpe", "Optuna's sampler, seeded by `seed`")
    seed: int = setting(
        0, "seeds the sampler and every trial's weights and batch order (below 2**31)"
    )
    n_startup_trials: int = setting(5, "random trials before TPE starts modelling")
    pruner: str = setting(
        "median",
        "successive_halving keeps the best third at epochs 2, 4, 10, ... (counted from "
        "`pruner_warmup_epochs`); rejudging_successive_halving asks again at every epoch until "
        "the next rung (src/digitune/pruners.py)",
    )
    pruner_startup_trials: int = setting(3, "trials that finish before the median pruner prunes")
    pruner_warmup_epochs: int = setting(
        1,
        "epochs a trial trains before it may be pruned (0: from the first); not given, on "
        "data other than MNIST: a tenth of max_epochs",
    )
    workers: int = setting(
        1,
        "worker processes running trials side by side (1 to 64), each with an equal share "
        "of the CPU threads (`--workers` overrides it)",
    )
    heartbeat_seconds: int = setting(
        20, "how often a running trial beats in a database storage (at least 1)"
    )
    heartbeat_grace_seconds: int = setting(
        60, "a trial silent this long (its worker was killed) is failed and retried"
    )
    max_retries: int = setting(2, "how often a dead worker's trial is retried")


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """The [training] table of a study file: how every trial trains."""

    backend: str = setting(
        "auto",
        "Keras's backend: auto is KERAS_BACKEND when set, else TensorFlow where it is "
        "installed, else JAX (which GPU machines without TensorFlow train on)",
    )
    max_epochs: int = setting(
        6,
        "epochs of a trial that is never pruned (at least 1); not given, on data other than "
        "MNIST: about MNIST's 2,346 optimizer steps (src/digitune/sizing.py)",
    )
    early_stopping_patience: int = setting(
        2,
        "epochs without a better validation accuracy before a trial stops; not given, on "
        "data other than MNIST: a third of max_epochs",
    )
    train_images: int = setting(0, "training images to use, the first ones (0: all)")
    validation_images: int = setting(0, "validation images to use, the first ones (0: all)")
    precision: str = setting(
        "auto",
        "Keras dtype policy while tuning; auto picks mixed_bfloat16 on a GPU or CPU that computes "
        "bfloat16, mixed_float16 on an older GPU, else float32. Registered models are float32",
    )
    steps_per_execution: int = setting(
        8,
        "batches per call into the backend (at least 1): fewer Python round trips, which small "
        "batches on a CPU feel most; per-batch callbacks (Ctrl-C) see every Nth batch",
    )
    epoch_images: int = setting(
        0,
        "training images an epoch trains: where validation accuracy is reported, pruned on and "
        "early-stopped on; an epoch carries on through the shuffled pass (0: a whole pass)",
    )


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The [data] table of a study file: what the study trains on (`digitune.data`)."""

    dataset: str = setting("mnist", 'a known dataset; "folder" with `folder` set')
    folder: str = setting(
        "",
        "a folder of pictures, one sub-folder per class, maybe in train/ and test/ "
        "(relative to the project); decoded once into data/folders/, then read a batch at a time",
    )
    image_size: int = setting(
        0, "resize a folder's pictures to this square side, 4-1024 (0: keep their size)"
    )
    color_mode: str = setting("auto", "a folder's pictures: auto is grayscale when all are")
    test_fraction: float = setting(
        0.2, "held out as the test set when a dataset has no test split of its own"
    )
    split_seed: int = setting(0, "seeds that hold-out; change it and the test set changes")

    @property
    def name(self) -> str:
        """The dataset's name: a known dataset's, or the folder's own (letters, digits, -)."""
        if not self.folder:
            return self.dataset
        return re.sub(r"[^A-Za-z0-9]+", "-", Path(self.folder).name).strip("-").lower() or "folder"

    def check(self, source: str) -> None:
        """A ValueError naming `source` unless the settings make sense together."""
        if self.folder and self.dataset not in ("mnist", "folder"):
            raise ValueError(f"{source}: give 'dataset' or 'folder', not both")
        if self.dataset == "folder" and not self.folder:
            raise ValueError(f"{source}: dataset = \"folder\" needs 'folder' (the pictures' path)")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"{source}: 'test_fraction' must be between 0 and 1 (exclusive)")
        if self.image_size and not 4 <= self.image_size <= 1024:
            raise ValueError(f"{source}: 'image_size' must be 0 (as the pictures are) or 4-1024")
        if (self.image_size or self.color_mode != "auto") and not self.folder:
            raise ValueError(
                f"{source}: 'image_size' and 'color_mode' are for a 'folder' of pictures; a "
                "known dataset comes as published"
            )


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """The [objectives] table: deployment costs minimised beside validation accuracy (a
    multi-objective study, not pruned) and limits on them (constraints; the trials stay
    single-objective and pruned when nothing is minimised). 0 = no limit."""

    minimize: tuple[str, ...] = setting(
        (), "costs minimised beside validation accuracy: the study becomes multi-objective"
    )
    max_params: float = setting(0.0, "limit on a model's weights (0: none)")
    max_int8_kb: float = setting(0.0, "limit on its int8 TFLite file, in KB (0: none)")
    max_latency_ms: float = setting(0.0, "limit on one image's latency, in ms (0: none)")

    @property
    def limits(self) -> dict[str, float]:  # {cost: limit} of the constraints set
        return {
            cost: getattr(self, f"max_{cost}") for cost in COSTS if getattr(self, f"max_{cost}")
        }

    @property
    def measured(self) -> bool:  # whether trials measure their costs
        return bool(self.minimize or self.limits)


@dataclasses.dataclass(frozen=True)
class RegistrySettings:
    """The [registry] table of a study file."""

    model_name: str = setting(
        "", "the registered model its best models become versions of (default: <dataset>-cnn)"
    )


SAMPLERS = ("tpe", "random", "nsga2")
COLOR_MODES = ("auto", "grayscale", "rgb")
PRUNERS = ("median", "hyperband", "none", "successive_halving", "rejudging_successive_halving")

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
BACKENDS = ("auto", "tensorflow", "jax")
