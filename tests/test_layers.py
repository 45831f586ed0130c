"""The package's shape: floors without cycles, one owner per concern, modules of a readable
size, and the entry points a Python user expects."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import digitune

PACKAGE = Path(digitune.__file__).parent
ROOT = PACKAGE.parents[1]
BIN = Path(sys.executable).parent


def _modules() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): path.read_text(encoding="utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_the_layers_contracts_hold():
    # import-linter reads both contracts (layers, no cycles) from pyproject.toml.
    result = subprocess.run(
        [BIN / "lint-imports", "--config", str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_no_module_is_far_past_the_soft_ceiling():
    # About 450 lines is where a module is worth reading again for a second concern; this fence
    # stands a little above it, so that a stage is never split by count alone.
    sizes = {name: text.count("\n") for name, text in _modules().items()}
    assert len(sizes) > 20
    assert {name: lines for name, lines in sizes.items() if lines > 500} == {}


def test_one_module_knows_the_run_layout_and_one_registers():
    modules = _modules()
    assert [name for name, text in modules.items() if "mlflow.parentRunId" in text] == [
        "tracking.py"
    ]
    # Run names are written in one place, and the folders of the files runs keep in another.
    names = re.compile(r'f"(trial|refit-trial|ensemble|select-trial)-')
    assert [name for name, text in modules.items() if names.search(text)] == ["tracking.py"]
    folders = re.compile(r'"(report|tflite|weights)/')
    assert [name for name, text in modules.items() if folders.search(text)] == ["artifacts.py"]
    registering = re.compile(r"registered_model_name|create_model_version|register_model\(")
    assert [name for name, text in modules.items() if registering.search(text)] == ["registry.py"]


def test_only_config_reads_the_environment():
    reading = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[[^]]+\](?!\s*=)")
    assert [name for name, text in _modules().items() if reading.search(text)] == ["config.py"]


def test_only_the_command_line_prints():
    printing = [
        name
        for name, text in _modules().items()
        if re.search(r"^\s*print\(", text, re.MULTILINE) and not name.startswith("cli/")
    ]
    assert printing == []


def test_python_dash_m_and_version():
    installed = importlib.metadata.version("digitune")
    assert installed == digitune.__version__
    version = subprocess.run(
        [BIN / "digitune", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"digitune {installed}"
    help_text = subprocess.run(
        [sys.executable, "-m", "digitune", "--help"], capture_output=True, text=True, check=True
    )
    assert help_text.stdout.startswith("usage: digitune")
    for command in ("tune", "report", "promote", "serve", "bench", "ui"):
        assert command in help_text.stdout
