"""The command line as a new user meets it: its help, the shipped studies, and `doctor`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from digitune import cli, config, study_file


def _help(*arguments: str) -> str:
    finished = subprocess.run(
        [sys.executable, "-m", "digitune", *arguments, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    return finished.stdout


def test_the_help_says_what_each_command_is_for_with_examples():
    text = _help()
    # The description is whole, not cut off mid-sentence.
    assert "promote the best\nmodel through the MLflow model registry." in text
    for command, purpose in {
        "tune": "run or resume a study",
        "register": "register it as @challenger",
        "doctor": "what a study would run on",
        "gpu-check": "throughput at three batch sizes",
        "serve": "serve the champion",
        "init": "copy the shipped study files",
    }.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(command))
        wrapped = " ".join((line + " " + text[text.index(line) :].split("\n")[1]).split())
        assert purpose in wrapped, command
    assert "examples:" in text and "digitune tune --study quick" in text
    tune = _help("tune")
    assert "--no-register" in tune and "--json" in tune and "examples:" in tune
    serve = " ".join(_help("serve").split())  # as one line, however argparse wraps it
    assert "--host HOST" in serve and "the address the API and the page listens on" in serve
    assert "--port PORT" in serve and "(default: 8000)" in serve
    assert "--host HOST" in _help("dashboard")


def test_shipped_studies_are_found_by_name_and_init_copies_them(project, capsys):
    shipped = config.shipped_studies()
    assert {"mnist-cnn.toml", "quick.toml", "full.toml"} <= {p.name for p in shipped.iterdir()}
    # Outside a clone (an empty project folder), a name finds the shipped study.
    assert study_file.load("quick").path == shipped / "quick.toml"
    with pytest.raises(ValueError, match=r"study file not found.*\bquick\b.*digitune init"):
        study_file.load("no-such-study")

    assert cli.main(["init"]) == 0
    assert "wrote" in capsys.readouterr().out
    copied = project / "studies" / "quick.toml"
    assert copied.read_text() == (shipped / "quick.toml").read_text()
    # Now the project's own copy is the one a name finds, and init keeps an edited one.
    copied.write_text(copied.read_text().replace("n_trials = 4", "n_trials = 5"))
    assert study_file.load("quick").path == copied
    assert study_file.load("quick").study.n_trials == 5
    assert cli.main(["init"]) == 0
    assert "kept" in capsys.readouterr().out and "n_trials = 5" in copied.read_text()


def test_a_missing_study_file_is_an_error_before_keras_loads(tmp_path):
    # In a process of its own, where nothing has loaded Keras (and TensorFlow, seconds to load):
    # the command answers at once.
    script = (
        "import sys; from digitune import cli; "
        "code = cli.main(['tune', '--study', 'no-such-study']); print(code, 'keras' in sys.modules)"
    )
    finished = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "DIGITUNE_HOME": str(tmp_path)},
    )
    assert finished.stdout.split() == ["1", "False"], finished.stderr
    assert "error: no-such-study: study file not found" in finished.stderr
    assert "quick" in finished.stderr and "digitune init" in finished.stderr


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (["models"], "no MLflow store at {home}/mlruns/mlflow.db"),
        (["report"], "no study 'mnist-cnn': {home}/studies/mnist-cnn.db does not exist"),
        (["gc", "--keep", "1"], "no MLflow store at {home}/mlruns/mlflow.db"),
        (["rollback"], "no MLflow store at {home}/mlruns/mlflow.db"),
        (["promote"], "no MLflow store at {home}/mlruns/mlflow.db"),
    ],
)
def test_a_command_outside_a_project_says_so_and_leaves_no_store_behind(tmp_path, command, missing):
    """Run where no `make tune` ever ran (a home folder, /tmp): an error naming the folder,
    and no mlruns/ with an empty database left there."""
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    finished = subprocess.run(
        [sys.executable, "-m", "digitune", *command],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**environment, "DIGITUNE_HOME": str(tmp_path)},
    )
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert missing.format(home=tmp_path) in finished.stderr
    assert "Traceback" not in finished.stderr
    assert list(tmp_path.iterdir()) == []


def test_doctor_says_what_a_study_runs_on_and_why(project, capsys):
    assert cli.main(["doctor", "--study", "quick"]) == 0
    # One "key  value" line each, the keys in a column of 14.
    lines = {line[:14].strip(): line[15:] for line in capsys.readouterr().out.splitlines()}
    assert set(lines) >= {"study", "backend", "devices", "precision", "NVIDIA GPUs", "workers"}
    assert lines["backend"].startswith(("tensorflow ", "jax "))
    assert "installed:" in lines["backend"]
    assert "cpu" in lines["devices"] or "gpu" in lines["devices"]
    assert lines["precision"].startswith("auto -> ") and "(" in lines["precision"]


def test_a_gpu_the_backend_cannot_use_is_a_warning_that_says_why(project, tmp_path):
    # A machine whose driver lists a GPU (a stand-in nvidia-smi) while the backend, a CPU
    # build, sees none: the study would train on the CPU, and says so, with what the backend
    # printed as it loaded, instead of falling back in silence.
    tools = tmp_path / "bin"
    tools.mkdir()
    smi = tools / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000)'\n")
    smi.chmod(0o755)
    environment = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}
    finished = subprocess.run(
        [sys.executable, "-m", "digitune", "doctor", "--study", "quick"],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    assert "1 GPU(s) present (GPU 0: NVIDIA H200), but" in finished.stderr
    assert "sees none: trials run on the CPU" in finished.stderr
    assert "GPU 0: NVIDIA H200" in finished.stdout  # doctor's own line about the driver
    assert "cpu" in finished.stdout.split("devices", 1)[1].splitlines()[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ui", "mlflow-server"])
def test_stopping_the_mlflow_server_stops_every_process_it_started(project, command):
    """SIGTERM to `digitune ui` (or `mlflow-server`) alone, as a service manager or `kill`
    sends it: MLflow's server and its uvicorn workers stop with it and free the port. They
    used to run on, orphaned (7 processes of 8 here)."""
    import signal
    import socket
    import time

    from conftest import command_lines, free_port, kill_session, wait_for

    port = free_port()
    digitune = subprocess.Popen(
        [sys.executable, "-m", "digitune", command, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", process=digitune)
        assert len(command_lines(session=digitune.pid)) > 2  # MLflow, uvicorn and its workers
        os.kill(digitune.pid, signal.SIGTERM)
        assert digitune.wait(timeout=60) == 0
        deadline = time.monotonic() + 30
        while command_lines(session=digitune.pid):
            assert time.monotonic() < deadline, command_lines(session=digitune.pid)
            time.sleep(0.2)
        with socket.socket() as probe:
            # Free again: a new server binds it (as servers do, past TIME_WAIT).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    finally:
        kill_session(digitune.pid)
