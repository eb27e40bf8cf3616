"""Shared pieces of the fault cases: keyed sample records (some broken on
purpose), comparing results with the reference Predictor, a slow engine for
fault injection, and reading a process's memory."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from pipeline.config import EngineConfig
from pipeline.engines import Engine, create_engine
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import Result, json_safe, record_bytes
from pipeline.tooling import sample_data
from tests.compare import difference


def keyed_records(workload: str, n: int, prefix: str, seed: int, *, broken: bool = True,
                  pad_bytes: int = 0) -> list[tuple[str, bytes, str | None]]:
    """``n`` good records (ids ``PREFIX-i``) with the workload's broken
    records interleaved (ids ``PREFIX-bad-j``): ``(id, wire bytes, reason code
    the pipeline must give, or None for a good record)``.  A broken record's
    id is its Kafka key, which its dead letter keeps.  ``pad_bytes`` adds a
    metadata field of that size to good records (a heavy flood)."""
    good = []
    for i, s in enumerate(sample_data.generate(workload, n, seed=seed, missing_rate=0.3)):
        rec = {**json_safe(s.record), "id": f"{prefix}-{i}"}
        if pad_bytes:
            rec["metadata"] = {"pad": "x" * pad_bytes}
        good.append((rec["id"], json.dumps(rec).encode(), None))
    bad = []
    if broken:
        for j, (rec, code) in enumerate(sample_data.broken_records(workload, seed)):
            value = record_bytes(rec)
            bad.append((f"{prefix}-bad-{j}", value, code))
    out: list[tuple[str, bytes, str | None]] = []
    step = max(1, len(good) // (len(bad) + 1))
    for i, g in enumerate(good):
        out.append(g)
        if bad and i % step == step - 1:
            out.append(bad.pop())
    return out + bad


def reference_predictor(package_dir: Path) -> Predictor:
    """The bare Predictor on ONNX Runtime: what every path must answer."""
    pkg = load_package(package_dir)
    return Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", threads=1)))


def expected_results(package_dir: Path, records: Iterable[tuple[str, bytes, str | None]]) -> dict[str, Result]:
    """The reference result of every good record, by id."""
    good = [(rid, value) for rid, value, code in records if code is None]
    pred = reference_predictor(package_dir)
    try:
        return {rid: r for (rid, _), r in zip(good, pred.predict([v for _, v in good]), strict=True)}
    finally:
        pred.close()




def count_mismatches(got: Iterable[Result], want: Mapping[str, Result]) -> int:
    """Results (every delivery, repeats included) that differ from the reference."""
    return sum(1 for g in got if g.id in want and difference(g, want[g.id]) is not None)


class SlowEngine:
    """Fault injection: the real engine, made slow by a fixed delay per
    batch (what a saturated GPU or a remote server looks like to a path).
    Everything else is the wrapped engine's."""

    def __init__(self, inner: Engine, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.name = inner.name
        self.provider = inner.provider
        self.calls = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (this one by default), in MB."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def settled_rss_mb() -> float:
    """This process's RSS after a garbage collection and returning freed
    heap to the OS, so a baseline does not count what earlier steps of the
    test (building a flood of records) left behind."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only; elsewhere the plain RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mb()


def start_and_wait_for_share(threads: list, answered: Mapping[str, object], total: int, share: float = 0.25) -> int:
    """Start the load threads and return once ``share`` of the ``total``
    records are answered (or every thread has stopped): the fault then
    strikes mid-load, not before the first answer or after the last.
    Returns how many were answered before the fault."""
    for t in threads:
        t.start()
    while len(answered) < total * share and any(t.is_alive() for t in threads):
        time.sleep(0.02)
    return len(answered)
