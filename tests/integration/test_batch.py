"""The Ray Data batch job on a real local Ray (2 CPUs, a private temp dir).

* mixed sample sets (images, 16-bit PNG and DICOM, audio, video keyframes,
  records broken on purpose) for all three workloads, from JSONL, a Parquet
  manifest with file URIs and a media folder: rows in = results + errors,
  each broken record is in the errors dataset with its reason code, and each
  result equals the Predictor's own result for the record;
* a rerun of the same run date replaces the run whole while a reader polls
  it; ``--resume`` skips the inputs already done;
* a driver killed mid-job (SIGKILL) publishes nothing, and ``--resume``
  finishes the run from the shards it had done;
* the job fed by a real tritonserver gives ONNX Runtime's results;
* the job pushes its metrics to a real Pushgateway; one that is down never
  fails the job.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray.data")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the ONNX export of the tiny packages

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch import JobOptions, run_batch
from pipeline.batch.output import read_errors, read_results, read_summary
from pipeline.config import BatchConfig, EngineConfig, MediaConfig, Settings
from pipeline.engines import create_engine
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import Result
from pipeline.tooling import sample_data
from tests.compare import assert_same as assert_same_list
from tests.integration import batch_helpers
from tests.integration import triton_server as ts
from tests.integration.batch_helpers import sample_lines, write_jsonl
from tests.integration.procs import pids_with
from tests.integration.pushgateway import Pushgateway, pushgateway_binary

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("medical", "retail", "media")
RUN_DATE = "2026-05-01"


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ONNX-exported tiny packages (shared with the Triton tests' export)."""
    root = tmp_path_factory.getbasetemp() / "triton-onnx-packages"
    return {w: ts.onnx_package(tiny_packages[w], root) for w in WORKLOADS}


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module, in a private temp dir; the jobs reuse it."""
    with batch_helpers.local_ray():
        yield


def settings_for(media_root: Path | None = None, **batch) -> Settings:
    return Settings(
        engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1),
        media=MediaConfig(allowed_uri_schemes=["file"], uri_root=media_root),
        batch=BatchConfig(**{"batch_size": 8, "shard_bytes": 96 * 1024, "shard_rows": 8, "progress": False,
                             **batch}),
    )


def reference(pkg_dir: Path, raws: list, media: MediaConfig | None = None) -> list[Result]:
    pkg = load_package(pkg_dir)
    pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")), media=media)
    try:
        return pred.predict(raws)
    finally:
        pred.close()




def assert_same(got: Result, want: Result) -> None:
    """One result row against the reference: the same model and version, and
    the same answer (tests.compare)."""
    assert got.model == want.model and got.model_version == want.model_version, got.id
    assert_same_list([got], [want])


def check_run(out: Path, workload: str, offsets: dict[int, bytes], want: list[Result],
              broken: dict[bytes, str]) -> dict:
    """The published run: counts identity, every broken line in the errors
    with its reason code, every result the Predictor's."""
    res = read_results(out).to_pylist()
    err = read_errors(out).to_pylist()
    res = [r for r in res if r["workload"] == workload and r["run_date"] == RUN_DATE]
    err = [e for e in err if e["workload"] == workload and e["run_date"] == RUN_DATE]
    summary = read_summary(out, RUN_DATE, workload)
    assert len(res) + len(err) == len(offsets) == summary["records_in"]
    assert summary["counts_match"] and summary["results"] == len(res) and summary["errors"] == len(err)
    by_pos = {e["position"]: e for e in err}
    assert len(by_pos) == len(err)
    for pos, line in offsets.items():
        if line in broken:
            assert pos in by_pos, f"broken line at byte {pos} missing from the errors dataset"
            assert by_pos[pos]["error_code"] == broken[line], (pos, by_pos[pos])
            assert by_pos[pos]["error_message"]
    assert sum(1 for e in err if e["position"] in offsets and offsets[e["position"]] in broken) == len(broken)
    want_ok = {r.id: r for r in want if r.error is None}
    assert len(want_ok) == len(res)
    for row in res:
        assert_same(Result.model_validate_json(row["result"]), want_ok[row["id"]])
        assert row["labels"] is not None
    want_err = sorted(r.error.code for r in want if r.error is not None)
    assert sorted(e["error_code"] for e in err) == want_err
    return summary


# -- the mixed sample sets -----------------------------------------------------------------------------------
@pytest.mark.parametrize("workload", WORKLOADS)
def test_mixed_jsonl_counts_errors_and_results(workload, packages, local_ray, tmp_path) -> None:
    lines, broken = sample_lines(workload, 36, seed=5)
    offsets = write_jsonl(tmp_path / "records.jsonl", lines)
    out = tmp_path / "out"
    summary = run_batch(settings_for(), JobOptions(input=str(tmp_path / "records.jsonl"), output=str(out),
                                                   run_date=RUN_DATE, package=str(packages[workload])))
    assert summary["shards"] > 2, "want several shards so records cross blocks and actors"
    assert summary["engine"].startswith("onnxruntime")
    check_run(out, workload, offsets, reference(packages[workload], lines), broken)
    recs = [json.loads(line) for line in lines if line not in broken]
    if workload == "medical":  # the set holds DICOM, 16-bit PNG and dictation audio
        images = [base64.b64decode(r["image"]) for r in recs if r.get("image")]
        assert any(b[128:132] == b"DICM" for b in images) and any(b[:4] == b"\x89PNG" for b in images)
        assert any(r.get("audio") for r in recs)
    if workload == "media":  # video keyframes and audio
        assert any(r.get("video") for r in recs) and any(r.get("audio") for r in recs)


def test_decode_in_tasks_gives_the_same_run(packages, local_ray, tmp_path) -> None:
    """The GPU layout (decode in CPU tasks feeding the inference actors,
    decoded blocks through the object store) writes the same rows as the CPU
    default (each actor running whole shards)."""
    lines, broken = sample_lines("medical", 36, seed=5)
    offsets = write_jsonl(tmp_path / "records.jsonl", lines)
    summaries = {}
    for mode in ("tasks", "actor"):
        out = tmp_path / f"out-{mode}"
        summaries[mode] = run_batch(settings_for(decode_in=mode), JobOptions(
            input=str(tmp_path / "records.jsonl"), output=str(out), run_date=RUN_DATE,
            package=str(packages["medical"])))
        assert summaries[mode]["ray"]["decode_in"] == mode
        check_run(out, "medical", offsets, reference(packages["medical"], lines), broken)
    assert summaries["actor"]["ray"]["concurrency"] >= 1 and summaries["tasks"]["ray"]["concurrency"] == 1


def test_parquet_manifest_with_file_uris_and_media_folder(packages, local_ray, tmp_path) -> None:
    """Parquet rows whose media are file URIs (one missing file), and a
    folder of media files grouped by stem."""
    media = tmp_path / "media"
    media.mkdir()
    samples = sample_data.generate("retail", 20, seed=8, missing_rate=0.2)
    records = []
    for s in samples:
        rec = dict(s.record)
        if isinstance(rec.get("image"), bytes):
            p = media / f"{rec['id']}.img"
            p.write_bytes(rec["image"])
            rec["image"] = p.as_uri()
        records.append(rec)
    records.append({"id": "retail-missing-file", "workload": "retail", "image": (media / "nope.png").as_uri()})
    records.append({"id": "retail-outside-root", "workload": "retail", "image": "file:///etc/hostname"})
    # tabular as JSON text (a struct column works too); absent fields are nulls.
    rows = [{"id": r["id"], "workload": r["workload"], "text": r.get("text"), "image": r.get("image"),
             "tabular": json.dumps(r["tabular"]) if r.get("tabular") else None} for r in records]
    table = pa.Table.from_pylist(rows, schema=pa.schema([(k, pa.string()) for k in rows[0]]))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(table, manifest, row_group_size=6)
    out = tmp_path / "out"
    settings = settings_for(media_root=media)
    summary = run_batch(settings, JobOptions(input=str(manifest), output=str(out), run_date=RUN_DATE,
                                             package=str(packages["retail"])))
    assert summary["shards"] == 4 and summary["records_in"] == len(rows)
    want = reference(packages["retail"], records, media=settings.media)
    res = {r["id"]: r for r in read_results(out).to_pylist()}
    err = {e["id"]: e for e in read_errors(out).to_pylist()}
    assert err["retail-missing-file"]["error_code"] == "uri_not_found"
    assert err["retail-outside-root"]["error_code"] == "uri_not_allowed"
    assert err["retail-missing-file"]["position"] == len(rows) - 2  # the row number in the manifest
    for w in want:
        if w.error is None:
            assert_same(Result.model_validate_json(res[w.id]["result"]), w)
        else:
            assert err[w.id]["error_code"] == w.error.code
    # A media folder: a.png + a.txt form one record; a file of garbage is rejected.
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    good = [s for s in samples if isinstance(s.record.get("image"), bytes) and s.record.get("text")][:5]
    for s in good:
        (folder / "sub" / f"{s.record['id']}.png").write_bytes(s.record["image"])
        (folder / "sub" / f"{s.record['id']}.txt").write_text(s.record["text"])
    (folder / "broken.jpg").write_bytes(b"\x00\x17 not an image at all" * 10)
    out2 = tmp_path / "out2"
    summary = run_batch(settings_for(), JobOptions(input=str(folder), output=str(out2), run_date=RUN_DATE,
                                                   package=str(packages["retail"])))
    assert summary["records_in"] == 6 and summary["results"] == 5
    assert summary["errors_by_reason"] == {"image_unsupported_format": 1}
    want = reference(packages["retail"], [{"id": f"sub/{s.record['id']}", "workload": "retail",
                                           "image": s.record["image"], "text": s.record["text"]} for s in good])
    res = {r["id"]: r for r in read_results(out2).to_pylist()}
    for w in want:
        assert_same(Result.model_validate_json(res[w.id]["result"]), w)


# -- reruns and resume ------------------------------------------------------------------------------------------
def test_rerun_replaces_atomically_and_resume_skips_done_inputs(packages, local_ray, tmp_path) -> None:
    pkg = str(packages["medical"])
    inp = tmp_path / "in"
    inp.mkdir()
    lines, broken = sample_lines("medical", 30, seed=6)
    write_jsonl(inp / "a.jsonl", lines[:20])
    write_jsonl(inp / "b.jsonl", lines[20:])
    out = tmp_path / "out"
    settings = settings_for()
    first = run_batch(settings, JobOptions(input=str(inp), output=str(out), run_date=RUN_DATE, package=pkg))
    assert first["records_in"] == len(lines)

    # A reader polling the published run while it is replaced sees one whole run at every read.
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                summ = read_summary(out, RUN_DATE, "medical")
                n = read_results(out).num_rows + read_errors(out).num_rows
                again = read_summary(out, RUN_DATE, "medical")
            except (FileNotFoundError, OSError):
                continue  # the directory listed a moment ago was swapped out: read again
            if summ == again:
                seen.append((summ["records_in"], n))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    (inp / "b.jsonl").unlink()  # the rerun's input has only a.jsonl
    try:
        second = run_batch(settings, JobOptions(input=str(inp), output=str(out), run_date=RUN_DATE, package=pkg))
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(10)
    assert second["records_in"] == 20 and second["shards_skipped"] == 0
    assert read_results(out).num_rows + read_errors(out).num_rows == 20
    assert seen, "the reader never saw the run"
    assert all(records == rows for records, rows in seen), f"a read saw a mixed run: {set(seen)}"
    assert second["delta_version"] == first["delta_version"] + 1, "a rerun is one commit"

    # --resume with a new input file: only the new file's shards run.
    write_jsonl(inp / "c.jsonl", lines[20:])
    third = run_batch(settings, JobOptions(input=str(inp), output=str(out), run_date=RUN_DATE, package=pkg,
                                           resume=True))
    assert third["shards_skipped"] == second["shards"]
    assert third["records_this_attempt"] == len(lines) - 20 and third["records_in"] == len(lines)
    res = read_results(out).to_pylist()
    assert {r["source"] for r in res} == {str(inp / "a.jsonl"), str(inp / "c.jsonl")}
    assert len(res) + read_errors(out).num_rows == len(lines)
    assert {e["error_code"] for e in read_errors(out).to_pylist()} == set(broken.values())
    # Nothing new: everything is skipped and the run stays as it was.
    fourth = run_batch(settings, JobOptions(input=str(inp), output=str(out), run_date=RUN_DATE, package=pkg,
                                            resume=True))
    assert fourth["shards_skipped"] == fourth["shards"] and fourth["records_this_attempt"] == 0
    assert fourth["records_in"] == len(lines) and read_results(out).num_rows == len(res)


def _done_records(done_dir: Path) -> int:
    """Records in the shards marked done so far (a marker being written is skipped)."""
    total = 0
    for marker in done_dir.glob("[!.]*.json"):
        with contextlib.suppress(OSError, ValueError):
            total += json.loads(marker.read_text())["records"]
    return total


def test_killed_driver_publishes_nothing_and_resume_finishes(packages, local_ray, tmp_path) -> None:
    pkg = str(packages["media"])
    lines, broken = sample_lines("media", 60, seed=7)
    offsets = write_jsonl(tmp_path / "records.jsonl", lines)
    out = tmp_path / "out"
    cfg = tmp_path / "batch.yaml"
    cfg.write_text("engine: {kind: onnxruntime, device: cpu, threads: 1}\n"
                   "batch: {batch_size: 1, shard_bytes: 16384, progress: false, ray_num_cpus: 2}\n")
    ray_tmp = tempfile.mkdtemp(prefix="mmray-k-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "driver.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "batch", "-c", str(cfg),
         "--package", pkg, "--input", str(tmp_path / "records.jsonl"), "--output", str(out),
         "--run-date", RUN_DATE, "--no-progress"],
        env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
    )
    done_dir = out / "_mmpipe" / "staging" / f"run_date={RUN_DATE}" / "workload=media"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            # Some shards done, records among them (byte-range shards of large
            # media records are often empty, and an empty shard is done at once).
            if done_dir.is_dir() and len(list(done_dir.glob("[!.]*.json"))) >= 3 and _done_records(done_dir):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the job ended before it was killed: {(tmp_path / 'driver.log').read_text()}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        for pid in pids_with(ray_tmp):  # the killed driver's own Ray processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not (out / "_delta_log").exists(), "a killed job published (part of) its run"
    tree = sorted(str(p.relative_to(out)) for p in out.rglob("*"))[:40]
    assert list(out.glob(f"run_date={RUN_DATE}/workload=media/part-*.parquet")), f"the workers wrote no files: {tree}"
    assert read_results(out).num_rows == 0 and read_errors(out).num_rows == 0, "uncommitted files are visible"
    done_before = len(list(done_dir.glob("[!.]*.json")))  # not a temp file the kill interrupted
    assert done_before >= 3
    # The same shard plan as the killed run (shard keys include the byte ranges).
    summary = run_batch(settings_for(shard_bytes=16384), JobOptions(
        input=str(tmp_path / "records.jsonl"), output=str(out), run_date=RUN_DATE, package=pkg, resume=True))
    assert summary["shards_skipped"] >= done_before
    assert summary["records_this_attempt"] < summary["records_in"] == len(lines)
    check_run(out, "media", offsets, reference(packages["media"], lines), broken)


# -- Triton -------------------------------------------------------------------------------------------------------
def test_job_on_triton_gives_onnxruntime_results(packages, local_ray, tmp_path) -> None:
    try:
        ts.find_dist()
        import tritonclient.grpc  # noqa: F401
    except (ts.TritonUnavailable, ImportError) as exc:
        pytest.skip(f"needs nvidia-pytriton and tritonclient[grpc]: {exc}")
    from exporters.triton_repo import DEPLOY_DIR, build_triton_repo, repository_models

    pkg_dir = packages["medical"]
    pkg = load_package(pkg_dir)
    repo = tmp_path / "repo"
    build_triton_repo(pkg.root, repo, max_batch_size=32, preprocess_instance_count=1)
    srv = ts.start_server(repo, repository_models(pkg.name)["cpu"], tmp_path / "triton",
                          onnxruntime_standin=DEPLOY_DIR / "onnxruntime_cpu" / "model.py")
    lines, _ = sample_lines("medical", 24, seed=9)
    write_jsonl(tmp_path / "records.jsonl", lines)
    try:
        tri = settings_for()
        tri.engine = EngineConfig(kind="triton", triton_url=srv.grpc_url, triton_model=f"{pkg.name}_cpu",
                                  triton_protocol="grpc", triton_timeout_s=30.0)
        s_tri = run_batch(tri, JobOptions(input=str(tmp_path / "records.jsonl"), output=str(tmp_path / "o-tri"),
                                          run_date=RUN_DATE, package=str(pkg_dir)))
    finally:
        srv.stop()
    s_ort = run_batch(settings_for(), JobOptions(input=str(tmp_path / "records.jsonl"),
                                                 output=str(tmp_path / "o-ort"), run_date=RUN_DATE,
                                                 package=str(pkg_dir)))
    assert s_tri["engine"].startswith("triton") and s_ort["engine"].startswith("onnxruntime")
    assert s_tri["errors_by_reason"] == s_ort["errors_by_reason"] and s_tri["results"] == s_ort["results"]
    tri_rows = {r["id"]: r for r in read_results(tmp_path / "o-tri").to_pylist()}
    ort_rows = {r["id"]: r for r in read_results(tmp_path / "o-ort").to_pylist()}
    assert set(tri_rows) == set(ort_rows) and len(ort_rows) == 24
    for rid, row in ort_rows.items():
        got = Result.model_validate_json(tri_rows[rid]["result"])
        assert got.engine == "triton"
        assert_same(got, Result.model_validate_json(row["result"]))
    assert sorted(e["position"] for e in read_errors(tmp_path / "o-tri").to_pylist()) == \
        sorted(e["position"] for e in read_errors(tmp_path / "o-ort").to_pylist())


# -- Pushgateway ----------------------------------------------------------------------------------------------------
def _worker_sum(gw: Pushgateway, name: str, job: str, **labels: str) -> float:
    """``name`` summed over the workers' groups (what Prometheus' sum() gives)."""
    total = 0.0
    want = {"path": "batch", "workload": "retail", "job": job, **labels}
    for line in gw.metrics().splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and "worker" in (have := dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))) \
                and all(have.get(k) == v for k, v in want.items()):
            total += float(m.group(2))
    return total


def test_metrics_pushed_to_a_real_pushgateway(packages, local_ray, tmp_path) -> None:
    binary, why = pushgateway_binary()
    if binary is None:
        pytest.skip(why)
    gw = Pushgateway(binary, tmp_path)
    gw.start()
    job = f"nightly-test-{os.getpid()}-{time.time_ns()}"  # this run's groups only
    lines, _ = sample_lines("retail", 10, seed=4)
    write_jsonl(tmp_path / "records.jsonl", lines)
    try:
        settings = settings_for(pushgateway_url=gw.url, pushgateway_job=job)
        t0 = time.time()
        summary = run_batch(settings, JobOptions(input=str(tmp_path / "records.jsonl"), output=str(tmp_path / "o"),
                                                 run_date=RUN_DATE, package=str(packages["retail"])))
        assert summary["pushgateway"] == {"url": gw.url, "pushed": True}
        labels = {"job": job, "workload": "retail"}
        assert gw.value("mmpipe_job_records", outcome="in", **labels) == len(lines)
        assert gw.value("mmpipe_job_records", outcome="ok", **labels) == summary["results"]
        assert gw.value("mmpipe_job_records", outcome="error", **labels) == summary["errors"] > 0
        assert gw.value("mmpipe_job_last_success_timestamp_seconds", **labels) >= t0
        assert gw.value("mmpipe_job_duration_seconds", **labels) > 0
        # Records and errors come from the workers' own registries (one group per worker), not the summary.
        assert _worker_sum(gw, "mmpipe_records_total", job, outcome="ok") == summary["results"]
        assert _worker_sum(gw, "mmpipe_record_errors_total", job, reason="bad_json") == 2
        assert _worker_sum(gw, "mmpipe_stage_seconds_count", job, stage="infer") > 0
    finally:
        gw.stop()
    # A Pushgateway that is down: the run is still published, the summary says it was not pushed.
    dead = f"http://127.0.0.1:{ts.free_ports(1)[0]}"
    summary = run_batch(settings_for(pushgateway_url=dead), JobOptions(
        input=str(tmp_path / "records.jsonl"), output=str(tmp_path / "o"), run_date=RUN_DATE,
        package=str(packages["retail"])))
    assert summary["pushgateway"]["pushed"] is False and summary["pushgateway"]["error"]
    assert read_summary(tmp_path / "o", RUN_DATE, "retail")["records_in"] == len(lines)
