"""Helpers for tests that run the Ray Data batch job on a real local Ray.

Shared by the batch tests (tests/integration/test_batch.py) and the fault
suite (tests/faults/): a private local Ray, sample JSONL with records broken
on purpose, and finding the processes of one of our own Ray clusters (the
only processes a test may kill).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.records import jsonl_line
from pipeline.tooling import sample_data

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, prefix: str = "mmray-t-") -> Iterator[Path]:
    """A local Ray in this process, in a private temp dir (other clusters on
    this machine are never touched); jobs run with ``run_batch`` reuse it.
    Yields the temp dir, which names the cluster's processes (see
    :func:`tests.integration.procs.pids_with`)."""
    import ray

    assert not ray.is_initialized()
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    old = os.environ.get("PYTHONPATH")
    # Ray's workers inherit the environment: they import this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([old] if old else [])])
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING")
        yield Path(tmp)
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def write_jsonl(path: Path, lines: list[bytes]) -> dict[int, bytes]:
    """Write lines; returns byte offset -> line (what error rows' position is)."""
    offsets, pos = {}, 0
    with path.open("wb") as fh:
        for line in lines:
            offsets[pos] = line
            fh.write(line + b"\n")
            pos += len(line) + 1
    return offsets


def sample_lines(workload: str, n: int, seed: int) -> tuple[list[bytes], dict[bytes, str]]:
    """Good records and broken ones interleaved, as JSONL lines; and the
    reason code each broken line must get."""
    good = [jsonl_line(s.record) for s in sample_data.generate(workload, n, seed=seed, missing_rate=0.3)]
    broken: dict[bytes, str] = {}
    for rec, code in sample_data.broken_records(workload, seed):
        broken[jsonl_line(rec)] = code
    lines: list[bytes] = []
    bl = list(broken)
    for i, g in enumerate(good):
        lines.append(g)
        if i % 3 == 0 and bl:
            lines.append(bl.pop())
    return lines + bl, broken
