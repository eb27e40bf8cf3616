"""The command line: help that teaches, clear errors, exit codes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=120)


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


def test_sigusr1_dumps_every_threads_stack_and_the_process_goes_on() -> None:
    code = ("import sys, threading, time; from pipeline.tooling.cli import _dump_stacks_on_sigusr1\n"
            "_dump_stacks_on_sigusr1()\n"
            "threading.Thread(target=time.sleep, args=(60,), name='worker', daemon=True).start()\n"
            "print('ready', flush=True); time.sleep(3); print('still running', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"still running" in out
    assert b"Current thread 0x" in err and b"\nThread 0x" in b"\n" + err and b"<string>" in err  # both threads
