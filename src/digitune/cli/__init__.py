"""The `digitune` command (also `python -m digitune`); every make target is a thin call of
one of its subcommands.

    digitune data                              fetch and verify MNIST
    digitune tune --study studies/quick.toml   run (or resume) a study
    digitune tune --workers 2                  ... in two worker processes
    digitune tune --storage URL --join         add this machine's workers to a study
    digitune tune --engine keras-tuner         the same study with Keras Tuner's Hyperband
    digitune report --study studies/quick.toml  summarise a study, log its figures
    digitune ensemble --top 5                  register the average of the 5 best trials
    digitune pareto --study studies/edge.toml  the front of accuracy against size and latency
    digitune select --max-params 10000         the best front model within limits -> challenger
    digitune dashboard                         optuna-dashboard on a study, live
    digitune bench                             training throughput, tuning race, ablation
    digitune promote [--margin M] [--force]    challenger -> champion, on evidence
    digitune rollback                          champion back to the previous one
    digitune models                            list the registered versions
    digitune export [--version N]              TFLite float16/int8 files of a version
    digitune serve [--port 8000]               the champion behind an API and a page
    digitune bench-serve                       latency of a running service
    digitune mlflow-server                     a tracking server for several machines
    digitune ui                                the MLflow UI on the project's store

`digitune <command> --help` lists each command's options. The commands of the tuning stage
are in `cli.tuning`, those of the registry and serving stage in `cli.models`. Library modules
log through `logging`; this module decides how that reaches the terminal.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import tqdm

import digitune
from digitune import config, quiet
from digitune.cli import deployment, models, tuning


def main(argv: list[str] | None = None) -> int:
    # Quieten TensorFlow's start-up chatter (CUDA probing on CPU machines) before it loads.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow announces routine work (creating its tables, say) at INFO; warnings still show.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # One line per trial should show up as it happens, also when piped to a file or `tee`.
    sys.stdout.reconfigure(line_buffering=True)
    _show_library_messages()
    args = parser().parse_args(argv)
    try:
        if args.uses_tensorflow:
            quiet.import_tensorflow()
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
}


def parser() -> argparse.ArgumentParser:
    command_line = argparse.ArgumentParser(prog="digitune", description=__doc__.split("\n")[0])
    command_line.add_argument(
        "--version", action="version", version=f"%(prog)s {digitune.__version__}"
    )
    # Commands that never load TensorFlow say so (set_defaults(uses_tensorflow=False)).
    command_line.set_defaults(uses_tensorflow=True)
    commands = command_line.add_subparsers(required=True, metavar="command")
    tuning.add_commands(commands)
    models.add_commands(commands)
    deployment.add_commands(commands)
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
