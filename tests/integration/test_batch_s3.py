"""The batch job publishing to object storage: a real S3-compatible server
(versitygw) on loopback, a Delta Lake table in a bucket.

Pinned here: a run is published whole (one Delta commit), a rerun replaces
it whole while a reader polling the table sees the old run or the new one
and never a mix, ``--resume`` skips finished shards, a driver killed with
SIGKILL mid-job leaves nothing visible, and an object store that goes away
mid-job fails the job (exit 1, nothing published) while a ``--resume`` once
it is back finishes the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from pipeline.batch import JobOptions, run_batch
from pipeline.batch.output import read_errors, read_results, read_summary, storage_options
from pipeline.config import BatchConfig, EngineConfig, Settings
from tests.integration import batch_helpers
from tests.integration import triton_server as ts
from tests.integration.batch_helpers import ROOT, sample_lines, write_jsonl
from tests.integration.k8s_tools import ToolUnavailable
from tests.integration.procs import pids_with
from tests.integration.s3_server import S3Server, versitygw_binary

RUN_DATE = "2026-05-01"
BUCKET = "tags"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        binary = versitygw_binary()
    except ToolUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"versitygw is required under CI: {exc}")
        pytest.skip(str(exc))
    server = S3Server(binary, tmp_path_factory.mktemp("s3") / "data")
    server.start()
    server.create_bucket(BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def packages(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "triton-onnx-packages"
    return {w: ts.onnx_package(tiny_packages[w], root) for w in ("retail", "media")}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    with batch_helpers.local_ray():
        yield


def settings_for(s3: S3Server, **batch) -> Settings:
    return Settings(engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1),
                    batch=BatchConfig(**{"batch_size": 8, "shard_bytes": 32 * 1024, "progress": False,
                                         "output_filesystem": s3.fs_options, **batch}))


def _rows(uri: str, s3: S3Server) -> int:
    from deltalake import DeltaTable

    df = DeltaTable(uri, storage_options=storage_options(uri, s3.fs_options)).to_pandas()
    return int(((df["run_date"] == RUN_DATE) & (df["workload"] == "retail")).sum())


def test_publish_rerun_replaces_whole_and_resume_skips(packages, local_ray, s3: S3Server, tmp_path: Path) -> None:
    pkg = str(packages["retail"])
    inp = tmp_path / "in"
    inp.mkdir()
    lines, broken = sample_lines("retail", 60, seed=11)
    write_jsonl(inp / "a.jsonl", lines[:40])
    write_jsonl(inp / "b.jsonl", lines[40:])
    uri = f"s3://{BUCKET}/nightly"
    settings = settings_for(s3)
    first = run_batch(settings, JobOptions(input=str(inp), output=uri, run_date=RUN_DATE, package=pkg))
    assert first["records_in"] == len(lines) == first["results"] + first["errors"]
    assert read_results(uri, s3.fs_options).num_rows == first["results"]
    assert {e["error_code"] for e in read_errors(uri, s3.fs_options).to_pylist()} == set(broken.values())
    assert read_summary(uri, RUN_DATE, "retail", s3.fs_options)["records_in"] == len(lines)

    # A pandas reader (through delta-rs) polling while the run is replaced sees a whole run at every read.
    seen: list[int] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(_rows(uri, s3))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    (inp / "b.jsonl").unlink()
    try:
        second = run_batch(settings, JobOptions(input=str(inp), output=uri, run_date=RUN_DATE, package=pkg))
    finally:
        time.sleep(0.5)
        stop.set()
        t.join(30)
    assert second["records_in"] == 40 and second["delta_version"] == first["delta_version"] + 1
    assert seen and set(seen) <= {len(lines), 40}, f"a reader saw a mixed run: {sorted(set(seen))}"
    assert seen[-1] == 40
    # The previous version is still there for time travel (Delta keeps it until vacuum).
    from deltalake import DeltaTable

    old = DeltaTable(uri, version=first["delta_version"], storage_options=storage_options(uri, s3.fs_options))
    assert len(old.to_pandas()) == len(lines)

    # --resume with a new input file: only its shards run.
    write_jsonl(inp / "c.jsonl", lines[40:])
    third = run_batch(settings, JobOptions(input=str(inp), output=uri, run_date=RUN_DATE, package=pkg, resume=True))
    assert third["shards_skipped"] == second["shards"]
    assert third["records_this_attempt"] == len(lines) - 40 and third["records_in"] == len(lines)
    assert _rows(uri, s3) == len(lines)


def _cli(cfg: Path, pkg: str, inp: Path, uri: str, ray_tmp: str, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "batch", "-c", str(cfg), "--package", pkg,
         "--input", str(inp), "--output", uri, "--run-date", RUN_DATE, "--no-progress", *extra],
        env=env, cwd=log.parent, start_new_session=True, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _markers(s3: S3Server, prefix: str) -> int:
    sel = pafs.FileSelector(f"{BUCKET}/{prefix}/_mmpipe/staging/run_date={RUN_DATE}/workload=media",
                            allow_not_found=True)
    return sum(1 for i in s3.filesystem().get_file_info(sel) if i.base_name.endswith(".json"))


def _config(tmp_path: Path, s3: S3Server) -> Path:
    cfg = tmp_path / "batch.yaml"
    cfg.write_text(yaml.safe_dump({
        "engine": {"kind": "onnxruntime", "device": "cpu", "threads": 1},
        "batch": {"batch_size": 1, "shard_bytes": 16384, "progress": False, "ray_num_cpus": 2,
                  "output_filesystem": s3.fs_options}}))
    return cfg


def _wait_markers(proc: subprocess.Popen, s3: S3Server, prefix: str, n: int, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _markers(s3, prefix) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the job did not reach {n} finished shards while running: {log.read_text()[-2000:]}")


def _kill_ray(ray_tmp: str) -> None:
    for pid in pids_with(ray_tmp):  # the killed driver's own Ray processes
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_killed_driver_leaves_nothing_visible_and_resume_finishes(packages, s3: S3Server, tmp_path: Path) -> None:
    pkg = str(packages["media"])
    lines, _ = sample_lines("media", 60, seed=7)
    write_jsonl(tmp_path / "records.jsonl", lines)
    uri = f"s3://{BUCKET}/killed"
    cfg = _config(tmp_path, s3)
    ray_tmp = tempfile.mkdtemp(prefix="mmray-k-", dir="/tmp")
    proc = _cli(cfg, pkg, tmp_path / "records.jsonl", uri, ray_tmp, tmp_path / "driver.log")
    try:
        _wait_markers(proc, s3, "killed", 2, tmp_path / "driver.log")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_ray(ray_tmp)
    assert read_results(uri, s3.fs_options).num_rows == 0 and read_errors(uri, s3.fs_options).num_rows == 0
    done_before = _markers(s3, "killed")
    proc = _cli(cfg, pkg, tmp_path / "records.jsonl", uri, ray_tmp, tmp_path / "resume.log", "--resume", "--json")
    assert proc.wait(300) == 0, (tmp_path / "resume.log").read_text()[-2000:]
    _kill_ray(ray_tmp)
    summary = read_summary(uri, RUN_DATE, "media", s3.fs_options)
    assert summary["shards_skipped"] >= done_before
    assert summary["records_in"] == len(lines) == summary["results"] + summary["errors"]
    assert read_results(uri, s3.fs_options).num_rows + read_errors(uri, s3.fs_options).num_rows == len(lines)


def test_store_unavailable_mid_job_fails_then_resume_finishes(packages, s3: S3Server, tmp_path: Path) -> None:
    """The object store goes away mid-job (the server is killed): exit 1,
    nothing published; back on the same port, ``--resume`` finishes."""
    pkg = str(packages["media"])
    lines, _ = sample_lines("media", 60, seed=8)
    write_jsonl(tmp_path / "records.jsonl", lines)
    uri = f"s3://{BUCKET}/outage"
    cfg = _config(tmp_path, s3)
    ray_tmp = tempfile.mkdtemp(prefix="mmray-o-", dir="/tmp")
    proc = _cli(cfg, pkg, tmp_path / "records.jsonl", uri, ray_tmp, tmp_path / "driver.log")
    try:
        _wait_markers(proc, s3, "outage", 1, tmp_path / "driver.log")
        s3.stop()
        rc = proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _kill_ray(ray_tmp)
        if s3.proc is None:
            s3.start()
    log = (tmp_path / "driver.log").read_text()
    assert rc == 1, log[-2000:]
    assert "nothing was published" in log
    assert read_results(uri, s3.fs_options).num_rows == 0 and read_errors(uri, s3.fs_options).num_rows == 0
    proc = _cli(cfg, pkg, tmp_path / "records.jsonl", uri, ray_tmp, tmp_path / "resume.log", "--resume")
    assert proc.wait(300) == 0, (tmp_path / "resume.log").read_text()[-2000:]
    _kill_ray(ray_tmp)
    summary = read_summary(uri, RUN_DATE, "media", s3.fs_options)
    assert summary["shards_skipped"] >= 1
    assert summary["records_in"] == len(lines) == summary["results"] + summary["errors"]
