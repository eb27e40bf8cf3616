"""The command line: help that teaches, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_commands_and_flow() -> None:
    out = run("--help").stdout
    for word in ("generate", "train", "package", "predict", "demo", "typical flow"):
        assert word in out


@pytest.mark.parametrize("cmd", ["generate", "train", "package", "predict", "demo", "batch"])
def test_each_command_has_help_with_examples(cmd: str) -> None:
    proc = run(cmd, "--help")
    assert proc.returncode == 0
    assert "usage: mmpipe " + cmd in proc.stdout
    if cmd != "demo":
        assert "example" in proc.stdout


def test_no_command_prints_help_and_fails() -> None:
    proc = run()
    assert proc.returncode == 2 and "COMMAND" in proc.stdout


def test_missing_package_is_a_clear_error(tmp_path) -> None:
    proc = run("predict", "--package", str(tmp_path / "nope"), "--input", "-")
    assert proc.returncode == 2
    assert "model package directory not found" in proc.stderr


def test_unknown_workload_is_a_clear_error(tmp_path) -> None:
    proc = run("generate", "--workload", "finance", "--out", str(tmp_path))
    assert proc.returncode == 2 and "unknown workload" in proc.stderr
