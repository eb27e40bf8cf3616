"""Fixtures of the fault suite and the collection of its outcomes.

Each case calls the ``report`` fixture with its :class:`FaultOutcome`
*before* asserting on it, so a failing case still shows its numbers.  At
the end of the session the outcomes (plus any case skipped, with the
reason) are printed as a table and, when ``MMPIPE_FAULTS_OUT`` names a
file, written there as JSON (``bench/faults.py`` does that).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.outcome import FaultOutcome, table

OUT_ENV = "MMPIPE_FAULTS_OUT"
WORKLOADS = ("retail", "media")

_outcomes: list[FaultOutcome] = []
_skipped: list[dict[str, str]] = []
_failed: list[str] = []


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[FaultOutcome], FaultOutcome]:
    """``report(outcome)``: keep a case's outcome for the session's table
    and JSON; the case's time counts from here (shared fixtures excluded)."""
    t0 = time.monotonic()

    def keep(outcome: FaultOutcome) -> FaultOutcome:
        outcome.seconds = round(time.monotonic() - t0, 1)
        outcome.details.setdefault("test", request.node.nodeid)
        _outcomes.append(outcome)
        return outcome

    return keep


@pytest.fixture(scope="session")
def packages(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ONNX-exported tiny packages (the directory the stream tests use, so a
    full run exports each workload once)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")  # the ONNX export of the tiny packages
    from tests.integration.triton_server import onnx_package

    root = tmp_path_factory.getbasetemp() / "onnx-packages"
    return {w: onnx_package(tiny_packages[w], root) for w in WORKLOADS}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.nodeid.startswith("tests/faults/"):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append({"test": report.nodeid, "reason": str(reason).removeprefix("Skipped: ")})
    elif report.failed:
        _failed.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _outcomes and not _skipped:
        return
    terminalreporter.section("fault suite: no fault may lose a record")
    terminalreporter.write_line(table(_outcomes))
    for s in _skipped:
        terminalreporter.write_line(f"skipped {s['test']}: {s['reason']}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    out = os.environ.get(OUT_ENV)
    if not out or not (_outcomes or _skipped or _failed):
        return
    data = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "cases": [o.to_json() for o in _outcomes],
        "skipped": _skipped,
        "failed": sorted(set(_failed)),
        "all_passed": not _failed and all(o.ok for o in _outcomes),
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
