"""`complexity --help` answers without importing torch; `import complexity` still registers the
Auto classes, and the command registers them itself once its arguments are parsed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from complexity.cli import COMMAND_MODULES

# The installed console script (pip writes it next to the interpreter of the environment).
SCRIPT = Path(sys.executable).parent / "complexity"
COMMANDS = [name.rsplit(".", 1)[1] for name in COMMAND_MODULES]
HEAVY = ("torch", "transformers")


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the console script as a user would, with the import log (-X importtime) on stderr."""
    assert SCRIPT.is_file(), f"{SCRIPT}: the `complexity` console script is not installed (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from `-X importtime` lines ("import time: self | cumulative | name")."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in COMMANDS]], ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(args):
    result = run_script(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: complexity" in result.stdout
    heavy = imported_modules(result.stderr) & set(HEAVY)
    assert not heavy, f"`complexity {' '.join(args)}` imported {sorted(heavy)}"


def test_info_lists_the_presets_for_an_unknown_name():
    # `info --help` stays torch-free, so the preset names come with the error for a wrong one.
    result = run_script("info", "no-such-preset")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tiny" in result.stderr and "tmlr-187m" in result.stderr and "pacific-prime" in result.stderr


def test_import_complexity_registers_the_auto_classes(tmp_path):
    """In a fresh interpreter, `import complexity` is enough for AutoModelForCausalLM to load our
    folders as our class (not a trust_remote_code copy)."""
    from _serve_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    code = (
        "import complexity\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
        "print(type(model).__module__, type(model).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["complexity.modeling_complexity", "ComplexityForCausalLM"]


def test_the_command_registers_after_parsing(tmp_path):
    """`complexity generate` loads through AutoModelForCausalLM: the registration the package
    deferred in the command's process must have happened before the command ran."""
    from _serve_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    result = run_script(
        "generate",
        str(ckpt),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
        "--threads",
        "1",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch" in imported_modules(result.stderr)  # the command itself does need it
