"""Fault cases on the Ray Data batch job.

5. The inference actor's process is killed (SIGKILL) while the job runs on
   a real local Ray.  Ray Data restarts the actor and retries its tasks; the
   job's collector drops the rows a retried task repeats.  The job either
   recovers or fails cleanly, and then ``--resume`` finishes it.  Either
   way nothing is visible before the final publish, and the published run
   holds exactly one row (result or error) per input line.
6. The output filesystem fills up (a small tmpfs in a private mount
   namespace): ``mmpipe batch`` exits 1 naming ENOSPC, publishes nothing,
   leaves no temp files, and a rerun with ``--resume`` once there is space
   publishes the run with records in = results + errors.

Accounting is by input position (the byte offset of each JSONL line), which
result and error rows carry, since broken lines may have no id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.data")

from pipeline.batch import JobOptions, run_batch
from pipeline.batch.output import read_errors, read_results, read_summary
from pipeline.config import BatchConfig, EngineConfig, Settings
from pipeline.records import Result
from tests.compare import difference
from tests.faults.common import reference_predictor
from tests.faults.outcome import FaultOutcome, account
from tests.integration import batch_helpers
from tests.integration.batch_helpers import sample_lines, write_jsonl
from tests.integration.procs import descendants

Report = Callable[[FaultOutcome], FaultOutcome]
ROOT = Path(__file__).resolve().parents[2]
RUN_DATE = "2026-05-01"


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    with batch_helpers.local_ray(prefix="mmray-f-") as tmp:
        yield tmp


def reference_rows(package: Path, offsets: dict[int, bytes]) -> dict[int, Result]:
    """The bare Predictor's result (or error) for every line, by byte offset."""
    pred = reference_predictor(package)
    try:
        return dict(zip(offsets, pred.predict(list(offsets.values())), strict=True))
    finally:
        pred.close()


def batch_outcome(case: str, offsets: dict[int, bytes], want: dict[int, Result], results: list[dict[str, Any]],
                  errors: list[dict[str, Any]], *, notes: str, details: dict[str, Any]) -> FaultOutcome:
    """Account result and error rows by input position; results must be the
    reference's, error rows must carry the reference's reason code."""
    mismatches = sum(1 for r in results
                     if difference(Result.model_validate_json(r["result"]), want[r["position"]]) is not None)
    mismatches += sum(1 for e in errors if want[e["position"]].error is None
                      or want[e["position"]].error.code != e["error_code"])
    return account(case, "batch", [str(p) for p in offsets], [str(r["position"]) for r in results],
                   [str(e["position"]) for e in errors], mismatches=mismatches, notes=notes, details=details)


# -- 5. an inference actor killed mid-job ----------------------------------------------------------------------------
def test_inference_actor_killed_during_batch_job(packages, ray_cluster, tmp_path: Path, report: Report) -> None:
    pkg = packages["retail"]
    lines, _ = sample_lines("retail", 300, seed=41)
    offsets = write_jsonl(tmp_path / "records.jsonl", lines)
    want = reference_rows(pkg, offsets)
    out = tmp_path / "out"
    settings = Settings(engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1),
                        batch=BatchConfig(batch_size=8, shard_bytes=24 * 1024, progress=False))
    opts = JobOptions(input=str(tmp_path / "records.jsonl"), output=str(out), run_date=RUN_DATE, package=str(pkg))
    delta_log = out / "_delta_log"  # the table exists once a run is published
    done_dir = out / "_mmpipe" / "staging" / f"run_date={RUN_DATE}" / "workload=retail"
    state: dict[str, Any] = {}

    def job() -> None:
        try:
            state["summary"] = run_batch(settings, opts)
        except BaseException as exc:  # judged below: a clean failure is allowed, then --resume
            state["exc"] = exc

    th = threading.Thread(target=job, daemon=True)
    th.start()
    killed: list[int] = []
    markers_at_kill = 0
    markers_when_visible: int | None = None  # done shards when a commit first appeared
    while th.is_alive():
        markers = len(list(done_dir.glob("[!.]*.json"))) if done_dir.is_dir() else 0
        if markers_when_visible is None and delta_log.exists():
            markers_when_visible = markers
        if not killed and markers >= 2:
            # ShardActor: decode_in actor (the CPU default); InferActor: decode_in tasks
            actors = descendants(os.getpid(), "ShardActor") or descendants(os.getpid(), "InferActor")
            if actors:
                os.kill(actors[0], signal.SIGKILL)
                killed.append(actors[0])
                markers_at_kill = markers
        time.sleep(0.02)
    th.join()
    shards = len(list(done_dir.glob("[!.]*.json"))) if done_dir.is_dir() else 0
    recovered = "summary" in state
    resumed = None
    if not recovered:
        # A clean failure: nothing published; --resume finishes from the shards done.
        assert not delta_log.exists() and read_results(out).num_rows == 0, "a failed job published (part of) its run"
        resumed = run_batch(settings, JobOptions(**{**opts.__dict__, "resume": True}))
    summary = state.get("summary") or resumed
    assert summary is not None
    # Published only once every shard was done (the commit follows the last marker).
    visible_early = markers_when_visible is not None and markers_when_visible < summary["shards"]
    res = [r for r in read_results(out).to_pylist() if r["run_date"] == RUN_DATE]
    err = [e for e in read_errors(out).to_pylist() if e["run_date"] == RUN_DATE]
    o = report(batch_outcome(
        "inference actor kill -9 mid-job", offsets, want, res, err,
        notes=(f"actor killed after {markers_at_kill} of {summary['shards']} shards; "
               + ("the job recovered (actor restarted, tasks retried)" if recovered
                  else f"the job failed cleanly ({type(state['exc']).__name__}); --resume finished it")),
        details={"killed_pids": killed, "recovered": recovered, "shards": summary["shards"],
                 "shards_done_at_kill": markers_at_kill, "visible_before_publish": visible_early,
                 "counts_match": summary["counts_match"], "records_in": summary["records_in"],
                 "shards_skipped_on_resume": resumed["shards_skipped"] if resumed else None,
                 "staging_markers_at_end": shards}))
    assert killed, "the job finished before an inference actor could be killed"
    assert not visible_early, "the run was visible before the job published it"
    assert summary["counts_match"] and summary["records_in"] == len(lines)
    assert o.losses == 0 and o.unexpected == 0, o.lost_ids
    assert o.duplicates == 0, "a retried task's rows were written twice"
    assert o.mismatches == 0
    assert read_summary(out, RUN_DATE, "retail")["records_in"] == len(res) + len(err)


# -- 6. disk full on the output path ---------------------------------------------------------------------------------
def namespace_launcher(probe_dir: Path) -> tuple[list[str] | None, str]:
    """A command prefix that runs a process in a private mount namespace
    where it may mount a tmpfs: ``unshare --mount`` (root), else
    ``unshare -r --mount`` (user namespaces).  (None, why) when neither works."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None, "unshare (util-linux) is not installed"
    why = []
    probe_dir.mkdir(parents=True, exist_ok=True)
    for prefix in ([unshare, "--mount", "--propagation", "private"],
                   [unshare, "--map-root-user", "--mount", "--propagation", "private"]):
        res = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe_dir)],
                             capture_output=True, text=True, timeout=60, check=False)
        if res.returncode == 0:
            return prefix, ""
        why.append(f"`{' '.join(prefix[1:])} mount -t tmpfs` failed: {(res.stderr or res.stdout).strip()}")
    return None, "; ".join(why)


def test_disk_full_on_the_output_path(packages, tmp_path: Path, report: Report) -> None:
    prefix, why = namespace_launcher(tmp_path / "probe")
    if prefix is None:
        pytest.skip(f"cannot make a small filesystem here (needs a private mount namespace): {why}")
    pkg = packages["retail"]
    lines, _ = sample_lines("retail", 200, seed=42)
    offsets = write_jsonl(tmp_path / "records.jsonl", lines)
    want = reference_rows(pkg, offsets)
    cfg = tmp_path / "batch.yaml"
    cfg.write_text("engine: {kind: onnxruntime, device: cpu, threads: 1}\n"
                   "batch: {batch_size: 8, shard_bytes: 16384, progress: false, ray_num_cpus: 2}\n")
    rep_path = tmp_path / "disk-full.json"
    small = "96k"
    cmd = [*prefix, sys.executable, "-m", "tests.faults.disk_full", "--dir", str(tmp_path / "small"),
           "--small", small, "--large", "64m", "--package", str(pkg), "--input", str(tmp_path / "records.jsonl"),
           "--config", str(cfg), "--report", str(rep_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0 and rep_path.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads(rep_path.read_text())
    full, after, rerun = rep["full"], rep["after_full"], rep["rerun"]
    summary = json.loads(rerun["stdout"][rerun["stdout"].index("{"):]) if rerun["rc"] == 0 else {}
    o = report(batch_outcome(
        "disk full on the output path", offsets, want, rep["results"],
        [{"position": e["position"], "error_code": e["code"]} for e in rep["errors"]],
        notes=(f"{small} tmpfs: exit {full['rc']}, {after['published_result_rows']} rows published, "
               f"{after['staging_done_markers']} shards kept; rerun with space: exit {rerun['rc']}, "
               f"{summary.get('shards_skipped', '?')} shards skipped"),
        # What the user saw: the command's own "error:" lines, with this run's temp dir named as such.
        details={"first_exit_code": full["rc"], "first_error": "\n".join(
                     line.replace(str(tmp_path), "<tmp>") for line in full["stderr"].splitlines()
                     if line.startswith(("error:", "nothing was published"))),
                 "after_full": after, "rerun_exit_code": rerun["rc"], "after_rerun": rep["after_rerun"],
                 "shards": summary.get("shards"), "shards_skipped": summary.get("shards_skipped"),
                 "counts_match": summary.get("counts_match")}))
    assert full["rc"] == 1, full["stderr"]
    assert "ENOSPC" in full["stderr"] and "full" in full["stderr"], full["stderr"]
    assert not after["final_exists"] and after["published_result_rows"] == 0 == after["published_error_rows"]
    assert after["staging_temp_files"] == 0, "an interrupted write left a temp file"
    assert rerun["rc"] == 0, rerun["stderr"]
    assert summary["counts_match"] and summary["records_in"] == len(lines)
    assert o.losses == 0 and o.unexpected == 0 and o.duplicates == 0 and o.mismatches == 0, o.lost_ids
