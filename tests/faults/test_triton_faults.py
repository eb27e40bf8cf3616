"""Fault case 4: tritonserver killed (SIGKILL to its process group, stubs
included) and restarted on the same ports while Predictors with the Triton
engine keep sending batches.

The engine retries transient failures (connection refused or reset,
``UNAVAILABLE``) with exponential backoff; with a retry budget longer than
the restart, every good record gets its result and no batch fails.  Had
the budget run out, the records would come back as ``inference_failed``
error results, never vanish: the case checks both that no record is lost and
that none needed to fail.  Records broken on purpose are rejected locally
with their reason codes before any request.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration import triton_server as ts

try:
    ts.find_dist()
    import tritonclient.grpc  # noqa: F401
except (ts.TritonUnavailable, ImportError) as exc:  # only a missing install skips; everything else fails
    pytest.skip(f"the Triton fault case needs nvidia-pytriton and tritonclient[grpc]: {exc}",
                allow_module_level=True)

from deploy.triton.server import find_server, launch
from exporters.triton_repo import build_triton_repo, repository_models
from pipeline.config import EngineConfig, Settings
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import Result
from tests.faults.common import count_mismatches, expected_results, keyed_records, start_and_wait_for_share
from tests.faults.outcome import FaultOutcome, account

Report = Callable[[FaultOutcome], FaultOutcome]


def test_triton_killed_and_restarted_under_load(packages, tmp_path: Path, report: Report, caplog) -> None:
    pkg = load_package(packages["retail"])
    repo = tmp_path / "repo"
    build_triton_repo(pkg.root, repo, max_batch_size=32, preprocess_instance_count=1)
    models = repository_models(pkg.name)["cpu"]
    srv = ts.start_server(repo, models, tmp_path)
    records = keyed_records("retail", 300, prefix="tr", seed=31)
    want = expected_results(packages["retail"], records)
    settings = Settings(engine=EngineConfig(
        kind="triton", triton_url=srv.grpc_url, triton_model=f"{pkg.name}_cpu", triton_protocol="grpc",
        triton_timeout_s=30.0, triton_retries=10, triton_backoff_s=0.25))
    caplog.set_level("WARNING", logger="pipeline.engines.triton_engine")
    todo: queue.Queue[list[tuple[str, bytes]]] = queue.Queue()
    chunk = 8
    for i in range(0, len(records), chunk):
        todo.put([(rid, v) for rid, v, _ in records[i:i + chunk]])
    got: dict[str, list[Result]] = {}
    crashed: list[BaseException] = []
    lock = threading.Lock()
    predictors = [Predictor.from_settings(settings, str(pkg.root), path="triton-fault") for _ in range(3)]

    def work(pred: Predictor) -> None:
        while True:
            try:
                batch = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results = pred.predict([v for _, v in batch])
            except BaseException as exc:  # a crash would lose the batch: counted, then reported
                crashed.append(exc)
                continue
            with lock:
                for (rid, _), res in zip(batch, results, strict=True):
                    got.setdefault(rid, []).append(res)

    restarted = None
    try:
        threads = [threading.Thread(target=work, args=(p,), daemon=True) for p in predictors]
        answered_before_kill = start_and_wait_for_share(threads, got, len(records))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(srv.proc.pid, signal.SIGKILL)  # a crash: the server and its python stubs at once
        srv.proc.wait(30)
        t_kill = time.monotonic()
        time.sleep(2)
        # The same ports, as a restarted pod behind a Service would have.
        install = find_server(tmp_path, prefer_pytriton=True)
        restarted = launch(install, repo, models, cwd=tmp_path, log_path=tmp_path / "tritonserver-restart.log",
                           http_port=srv.http_port, grpc_port=srv.grpc_port, metrics_port=srv.metrics_port)
        assert restarted.wait_ready(180), restarted.log_tail()
        down_s = time.monotonic() - t_kill
        for t in threads:
            t.join(300)
    finally:
        for p in predictors:
            p.close()
        srv.stop(5)
        if restarted is not None:
            restarted.stop()
    retries = [r for r in caplog.records if r.getMessage() == "triton_retry"]
    results = [r for rs in got.values() for r in rs if r.error is None]
    errors = [r for rs in got.values() for r in rs if r.error is not None]
    codes = {rid: code for rid, _, code in records}
    failed_inference = sum(1 for e in errors if e.error is not None and e.error.code == "inference_failed")
    wrong_codes = sum(1 for rid, rs in got.items() for r in rs
                      if r.error is not None and r.error.code not in (codes[rid], "inference_failed"))
    o = report(account(
        "Triton kill -9 + restart under load", "triton", [rid for rid, _, _ in records],
        [rid for rid, rs in got.items() for r in rs if r.error is None],
        [rid for rid, rs in got.items() for r in rs if r.error is not None],
        retries=len(retries), mismatches=count_mismatches(results, want),
        notes=f"server down {down_s:.0f} s after {answered_before_kill} answers; {len(retries)} engine retries; "
              f"{failed_inference} inference_failed",
        details={"down_s": round(down_s, 1), "answered_before_kill": answered_before_kill,
                 "inference_failed": failed_inference, "wrong_reason_codes": wrong_codes,
                 "engine": {"timeout_s": 30.0, "retries": 10, "backoff_s": 0.25}, "crashed": len(crashed)}))
    assert not crashed, crashed[:3]
    assert o.losses == 0 and o.unexpected == 0, o.lost_ids
    assert o.duplicates == 0 and o.mismatches == 0 and wrong_codes == 0
    assert retries, "the outage was never seen by the engine (killed too late?)"
    assert failed_inference == 0, "the retry budget outlasts a restart: every good record should get a result"
    assert o.errors == sum(1 for c in codes.values() if c)
