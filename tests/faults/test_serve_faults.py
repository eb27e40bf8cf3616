"""Fault case 3: a Ray Serve model replica killed (SIGKILL) under load.

``mmpipe serve`` runs the retail model with two server replicas.  Client threads
keep sending records to ``POST /v1/retail/predict`` while one replica's
process is killed; Serve's controller starts a replacement.  A request that
fails meanwhile (connection error, or a 5xx from the proxy or HAProxy in
front of the dead replica) is retried by the client with backoff: inference
has no side effects, so resending is safe.  Failed attempts are counted as
retries, apart from losses; every record must end with the Predictor's
answer (or, for a record broken on purpose, its reason code).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline.records import Result
from tests.faults.common import count_mismatches, expected_results, keyed_records, start_and_wait_for_share
from tests.faults.outcome import FaultOutcome, account
from tests.integration.procs import descendants
from tests.integration.serve_helpers import Server, running_serve, serve_app

pytest.importorskip("ray.serve", reason="the Serve fault case needs ray[serve]")

Report = Callable[[FaultOutcome], FaultOutcome]
REPLICA = "ServeReplica:mmpipe:server"
"""The process title Ray gives the server deployment's replicas (the retail model's)."""
RETRY_STATUSES = {500, 502, 503, 504}
"""What a dead replica looks like to a client: the proxy's call failed (500)
or no replica could take the request (503); 502/504 from HAProxy in front."""


class RetryingClient:
    """POSTs one record at a time to the friendly API and retries a failed
    attempt (connection error, 5xx) with exponential backoff until
    ``deadline_s`` after the record's first attempt."""

    def __init__(self, url: str, deadline_s: float = 180.0) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.failed_attempts: list[str] = []  # what each failed attempt was (status or exception type)
        self.session = requests.Session()

    def predict(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of the first attempt that was not a transient failure."""
        start, delay = time.monotonic(), 0.1
        while True:
            try:
                r = self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
                if r.status_code not in RETRY_STATUSES:
                    return r.status_code, r.json()
                self.failed_attempts.append(str(r.status_code))
            except requests.RequestException as exc:
                self.failed_attempts.append(type(exc).__name__)
                self.session.close()
                self.session = requests.Session()
            if time.monotonic() - start > self.deadline_s:
                raise TimeoutError(f"no answer within {self.deadline_s} s")
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def replicas(srv: Server) -> list[int]:
    return descendants(srv.proc.pid, REPLICA)


def test_serve_replica_killed_under_load(packages, tmp_path: Path, report: Report) -> None:
    records = keyed_records("retail", 300, prefix="sv", seed=21)
    # Bytes that are not JSON get a 400 with their reason code; the rest a 200
    # whose body is the result or the record's error.
    want = expected_results(packages["retail"], records)
    app = serve_app("mmpipe", "/", [{"package": str(packages["retail"])}],
                    settings={"log_level": "INFO"},
                    deployment_options={"num_replicas": 2, "max_ongoing_requests": 16,
                                        "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}})
    with running_serve([app], tmp_path) as srv:
        deadline = time.monotonic() + 120
        while len(replicas(srv)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        before = replicas(srv)
        assert len(before) == 2, f"expected two replica processes, found {before}"
        todo: queue.Queue[tuple[str, bytes]] = queue.Queue()
        for rid, value, _ in records:
            todo.put((rid, value))
        answers: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        clients = [RetryingClient(f"{srv.url}/v1/retail/predict") for _ in range(4)]
        crashed: list[BaseException] = []
        lock = threading.Lock()

        def work(c: RetryingClient) -> None:
            while True:
                try:
                    rid, value = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    answer = c.predict(value)
                except BaseException as exc:  # reported below: the record then counts as lost
                    crashed.append(exc)
                    continue
                with lock:
                    answers.setdefault(rid, []).append(answer)

        threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in clients]
        answered_before_kill = start_and_wait_for_share(threads, answers, len(records))
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join(300)
        replaced = False
        while time.monotonic() - killed_at < 120:
            now = replicas(srv)
            if len(now) == 2 and victim not in now:
                replaced = True
                break
            time.sleep(0.5)
    results, errors, wrong_codes = [], [], 0
    codes = {rid: code for rid, _, code in records}
    for rid, got in answers.items():
        for status, body in got:
            err = body.get("error")
            if status == 200 and err is None:
                results.append(Result.model_validate({**body, "id": rid}))
            else:
                errors.append(rid)
                wrong_codes += (err or {}).get("code") != codes.get(rid)
    failed = [a for c in clients for a in c.failed_attempts]
    o = report(account(
        "Serve replica kill -9 under load", "online", [rid for rid, _, _ in records], [r.id for r in results],
        errors, retries=len(failed), mismatches=count_mismatches(results, want),
        notes=f"1 of 2 replicas killed after {answered_before_kill} answers; {len(failed)} failed attempts "
              f"retried by the client; replica replaced: {'yes' if replaced else 'no'}",
        details={"clients": len(clients), "failed_attempts_by_kind": {k: failed.count(k) for k in set(failed)},
                 "answered_before_kill": answered_before_kill, "replica_replaced": replaced,
                 "wrong_reason_codes": wrong_codes, "client_gave_up": len(crashed)}))
    assert not crashed, crashed[:3]
    assert o.losses == 0 and o.unexpected == 0, o.lost_ids
    assert o.duplicates == 0, "one answer per request"
    assert o.mismatches == 0 and wrong_codes == 0
    assert o.errors == sum(1 for c in codes.values() if c), "only the broken records may be errors"
    assert replaced, "Serve did not replace the killed replica"
