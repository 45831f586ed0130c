"""The `digitune` command (also `python -m digitune`); every make target is a thin call of
one of its subcommands, grouped by stage: `cli.tuning` (init, data, tune, report, ensemble,
bench), `cli.models` (promote, register, rollback, models, gc, export, serve, bench-serve),
`cli.servers` (mlflow-server, ui), `cli.deployment` (pareto, select, dashboard) and
`cli.devices` (doctor, gpu-check). `digitune <command>
--help` lists each command's options. Library modules log through `logging`; this module
decides how that reaches the terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import tqdm

import digitune
from digitune import backend, config
from digitune.cli import deployment, devices, models, servers, tuning


def main(argv: list[str] | None = None) -> int:
    # Quieten TensorFlow's start-up chatter (CUDA probing on CPU machines) before it loads.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow announces routine work (creating its tables, say) at INFO; warnings still show.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # One line per trial should show up as it happens, also when piped to a file or `tee`.
    sys.stdout.reconfigure(line_buffering=True)
    config.redact_every_log_record()
    _show_library_messages()
    args = parser().parse_args(argv)
    try:
        # Keras reads its backend once, when it loads: settled here, before any command runs.
        needs = args.backend
        setting = "tensorflow" if needs == "tensorflow" else "auto"
        if needs == "study":
            setting = backend.setting_of(getattr(args, "study", None))
        name = backend.choose(setting)
        if needs != "none":
            _load(name, needs)
        return args.handler(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: every finished trial is saved; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    except ModuleNotFoundError as error:
        extra = _EXTRAS.get((error.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"error: this command needs {error.name}, which digitune's '{extra}' extra "
            f"installs: pip install 'digitune[{extra}]' (make install installs every extra)",
            file=sys.stderr,
        )
        return 1
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {config.redact(str(error))}", file=sys.stderr)
        return 1
    except Exception as error:
        # The stores' own errors (an unreachable database, a refused request) are the user's
        # to act on as well; anything else is a bug and keeps its traceback.
        if not type(error).__module__.startswith(("mlflow", "optuna", "sqlalchemy")):
            raise
        print(f"error: {type(error).__name__}: {config.redact(str(error))}", file=sys.stderr)
        return 1


def _load(name: str, needs: str) -> None:
    try:
        backend.load(name)
    except ModuleNotFoundError as error:
        if error.name not in backend.BACKENDS:
            raise
        why = (
            "SavedModels and TFLite files need it" if needs == "tensorflow" else "the study uses it"
        )
        raise RuntimeError(
            f"this command needs {name}, which is not installed here ({why}): pip install "
            + ("tensorflow" if name == "tensorflow" else "'digitune[jax]'")
        ) from None


# The optional parts of digitune (pyproject.toml's extras), by the module each one brings.
_EXTRAS = {
    "keras_tuner": "keras-tuner",
    "tensorboard": "keras-tuner",
    "fastapi": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "python_multipart": "serve",
    "psycopg": "postgres",
    "psycopg2": "postgres",
    "optuna_dashboard": "dashboard",
    "boto3": "s3",
}


DESCRIPTION = """Tune Keras CNNs with Optuna, track every trial in MLflow, and promote the best
model through the MLflow model registry."""
EXAMPLES = """examples:
  digitune tune                         run (or resume) the default study, register its best
  digitune tune --study quick           a two-minute smoke study shipped with digitune
  digitune ui                           compare the trials in the MLflow UI
  digitune promote                      @challenger -> @champion if better on the test set
  digitune serve                        @champion behind an API and a page to draw on
  digitune init                         copy the shipped study files into ./studies to edit

Every make target calls one of these (`make` lists them); see the README.
"""


def parser() -> argparse.ArgumentParser:
    command_line = argparse.ArgumentParser(
        prog="digitune",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command_line.add_argument(
        "--version", action="version", version=f"%(prog)s {digitune.__version__}"
    )
    # The backend a command loads before it runs: "study" (its study file's, else Keras's or
    # what is installed), "tensorflow" (SavedModels and TFLite files need it whatever trained
    # the model), or "none" (loaded only if it imports Keras).
    command_line.set_defaults(backend="study")
    commands = command_line.add_subparsers(required=True, metavar="command")
    tuning.add_commands(commands)
    models.add_commands(commands)
    servers.add_commands(commands)
    deployment.add_commands(commands)
    devices.add_commands(commands)
    return command_line


class _TerminalHandler(logging.Handler):
    """Library messages as plain lines: information on stdout, written above a progress bar
    if one is showing; warnings on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = config.redact(self.format(record))
            if record.levelno >= logging.WARNING:
                print(f"warning: {message}", file=sys.stderr)
            else:
                tqdm.tqdm.write(message, file=sys.stdout)
        except Exception:  # noqa: BLE001 -- logging must never break the command.
            self.handleError(record)


def _show_library_messages() -> None:
    logger = logging.getLogger("digitune")
    for handler in [h for h in logger.handlers if isinstance(h, _TerminalHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_TerminalHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
