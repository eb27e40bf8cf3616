"""One answer on every path: the cross-path parity suite, on real servers.

One set of records: all three workloads, every modality (report text,
8- and 16-bit PNG and DICOM imaging, product photos as JPEG/PNG/WebP,
price and weight, video keyframes, dictation and soundtrack audio), with
about a third of the modalities dropped at random, plus each workload's
records broken on purpose (with an id) and the reason code each must get.
They go through every path, each one the code a user runs:

    torch        the PyTorch reference                    (in process)
    onnx-fp32    ONNX Runtime, fp32                       (in process)
    onnx-int8    ONNX Runtime, int8                       (in process; trained models only, see below)
    serve-v1     Ray Serve, POST /v1/{workload}/predict   (``mmpipe serve``, HTTP)
    serve-v2     Ray Serve, Open Inference Protocol       (tensors over HTTP, tritonclient)
    triton-grpc  Triton                                   (the real tritonserver, gRPC)
    batch        the Ray Data batch job                   (``run_batch`` on a local Ray, Parquet read back)
    stream       the Kafka stream                         (a StreamConsumer on a real Apache Kafka broker)

through the runners of ``mmpipe verify`` (pipeline/tooling/verify.py).  Labels must
be identical and scores within the tolerance of the variant on every pair
of paths; every broken record must be rejected with its reason code on
every path, and no path may lose a record.  The path x path matrix is
printed (``-s`` shows it) and, with ``MMPIPE_PARITY_JSON=FILE``, written as
JSON (``python -m bench.parity`` writes bench/results/parity.json).

Models: by default the session's tiny packages (a few training steps), which
keep this module to a few minutes.  Their int8 export cannot pass its own
parity gate (near-tied scores flip under quantisation: 95-98% label
agreement), so int8 is checked in ``test_int8_variant_on_a_trained_model``
on the demo's trained retail model (``pipeline.tooling.demo.cached_package``,
trained once per code version, about 20 s, cached under
~/.cache/mmpipe/models).  ``MMPIPE_PARITY_MODELS=demo`` runs every path on
the demo's trained models of all three workloads instead, int8 in the same
matrix (training the two that are not cached takes minutes: the benchmark
run does this).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="the parity suite needs ray[serve,data]")
pytest.importorskip("kafka")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the PyTorch reference and the ONNX export
pytest.importorskip("tritonclient.grpc")

from exporters.triton_repo import DEPLOY_DIR, build_triton_repo
from pipeline.config import BatchConfig, EngineConfig, Settings, StreamConfig
from pipeline.package import ModelPackage, load_package
from pipeline.tooling import sample_data
from pipeline.tooling.verify import (
    PathRun,
    PathSpec,
    batch_path,
    format_matrix,
    merge_runs,
    oip_path,
    package_paths,
    report,
    run_paths,
    serve_v1_path,
    stream_path,
)
from tests.integration import triton_server as ts
from tests.integration.batch_helpers import local_ray
from tests.integration.kafka_broker import KafkaBroker
from tests.integration.serve_helpers import Server, running_serve, serve_app
from tests.integration.stream_helpers import StreamProc, topics
from tests.integration.stream_helpers import settings_for as stream_settings

WORKLOADS = ("medical", "retail", "media")
GOOD_PER_WORKLOAD = 24
SEED = 21
MODELS = os.environ.get("MMPIPE_PARITY_MODELS", "tiny")
REPORT_JSON = os.environ.get("MMPIPE_PARITY_JSON")
PATH_ORDER = ("torch", "onnx-fp32", "onnx-fp16", "onnx-int8", "serve-v1", "serve-v2", "triton-grpc", "batch",
              "stream")


# -- the records ------------------------------------------------------------------------------------------------
def parity_records(workload: str) -> tuple[list[Any], dict[str, str]]:
    """Good records with modalities dropped at random, then the broken ones
    that carry an id (records without one cannot be matched across paths),
    and the reason code each broken record must get."""
    good = [s.record for s in sample_data.generate(workload, GOOD_PER_WORKLOAD, seed=SEED, missing_rate=0.3)]
    broken = [(rec, code) for rec, code in sample_data.broken_records(workload, SEED)
              if isinstance(rec, dict) and isinstance(rec.get("id"), str)]
    return good + [rec for rec, _ in broken], {rec["id"]: code for rec, code in broken}


def _image_kind(data: bytes) -> str:
    if data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG"):
        return "png16" if data[24] == 16 else "png"
    if data.startswith(b"\xff\xd8"):
        return "jpeg"
    return "webp" if data[8:12] == b"WEBP" else "other"


def coverage(records: list[Any]) -> Counter[str]:
    """What the good records carry, so the test can insist on every modality."""
    seen: Counter[str] = Counter()
    for r in records:
        if not isinstance(r, dict) or "-broken-" in str(r.get("id")):
            continue
        present = [m for m in ("text", "image", "audio", "video", "tabular") if r.get(m)]
        seen.update(present)
        if isinstance(r.get("image"), bytes):
            seen[f"image:{_image_kind(r['image'])}"] += 1
        seen["records"] += 1
        seen["missing_some"] += len(present) < 3
    return seen


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelPackage]:
    """Per workload, the package every path serves (ONNX exported)."""
    if MODELS == "demo":
        from pipeline.spec import load_workload
        from pipeline.tooling.demo import cached_package

        root = tmp_path_factory.mktemp("parity-demo")
        out = {}
        for w in WORKLOADS:
            src, _ = cached_package(load_workload(w))
            out[w] = load_package(shutil.copytree(src, root / w))
        return out
    if MODELS != "tiny":
        raise pytest.UsageError(f"MMPIPE_PARITY_MODELS={MODELS!r}: use tiny or demo")
    root = tmp_path_factory.getbasetemp() / "triton-onnx-packages"  # shared with the Triton and batch tests
    return {w: load_package(ts.onnx_package(tiny_packages[w], root)) for w in WORKLOADS}


@pytest.fixture(scope="module")
def records() -> dict[str, tuple[list[Any], dict[str, str]]]:
    return {w: parity_records(w) for w in WORKLOADS}


@pytest.fixture(scope="module")
def serve(packages: dict[str, ModelPackage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``mmpipe serve`` with the three packages in one application."""
    work = tmp_path_factory.mktemp("parity-serve")
    app = serve_app("mmpipe", "/", [{"package": str(p.root)} for p in packages.values()],
                    [p.name for p in packages.values()], settings={"log_level": "INFO"})
    with running_serve([app], work) as srv:
        yield srv


@pytest.fixture(scope="module")
def triton(packages: dict[str, ModelPackage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ts.TritonServer]:
    """The real tritonserver with each package's CPU model (``NAME_cpu``:
    ONNX Runtime in the python backend, what a CPU Triton node serves)."""
    work = tmp_path_factory.mktemp("parity-triton")
    repo = work / "repo"
    for pkg in packages.values():
        build_triton_repo(pkg.root, repo, max_batch_size=32, preprocess_instance_count=1)
    srv = ts.start_server(repo, sorted(f"{p.name}_cpu" for p in packages.values()), work,
                          onnxruntime_standin=DEPLOY_DIR / "onnxruntime_cpu" / "model.py")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray (2 CPUs, private temp dir) the batch job joins."""
    with local_ray():
        yield


@pytest.fixture(scope="module")
def parity_report() -> Iterator[dict[str, Any]]:
    """What the module's tests found; written to MMPIPE_PARITY_JSON at the end."""
    doc: dict[str, Any] = {}
    yield doc
    if REPORT_JSON and doc:
        path = Path(REPORT_JSON)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def settings_for(broker: KafkaBroker | None = None, names: tuple[str, str, str] | None = None) -> Settings:
    """One config for every path: ONNX Runtime on one thread, small batch
    shards (several shards per workload), small stream micro-batches."""
    stream = StreamConfig()
    if broker is not None and names is not None:
        stream = StreamConfig(bootstrap_servers=[broker.bootstrap], input_topics=[names[0]], output_topic=names[1],
                              dlq_topic=names[2], max_batch_records=8, max_wait_ms=20, session_timeout_ms=6000)
    return Settings(
        engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1, triton_timeout_s=60.0),
        batch=BatchConfig(batch_size=8, shard_bytes=256 * 1024, shard_rows=16, progress=False),
        stream=stream,
    )


def ordered(runs: list[PathRun]) -> list[PathRun]:
    return sorted(runs, key=lambda r: PATH_ORDER.index(r.name) if r.name in PATH_ORDER else len(PATH_ORDER))


def describe(runs: list[PathRun], records: dict[str, tuple[list[Any], dict[str, str]]]) -> dict[str, Any]:
    """The report, the matrix text and the record set, as one JSON document."""
    rep = report(runs)
    return {
        "models": MODELS,
        "records": {w: len(r[0]) for w, r in records.items()},
        "broken": {w: len(r[1]) for w, r in records.items()},
        "order": [r.name for r in runs],
        **rep,
        "matrix": format_matrix(runs),
    }


# -- the suite ----------------------------------------------------------------------------------------------------
def test_records_cover_every_modality_and_missing_ones(records) -> None:
    for w, (recs, broken) in records.items():
        seen = coverage(recs)
        want = {"medical": ("text", "image", "audio", "image:png", "image:png16", "image:dicom"),
                "retail": ("text", "image", "tabular", "image:jpeg"),
                "media": ("text", "image", "audio", "video")}[w]
        assert all(seen[m] > 0 for m in want), (w, seen)
        assert seen["missing_some"] > 0, f"{w}: no record misses a modality"
        assert len(broken) >= 8, f"{w}: only {len(broken)} broken records with ids"


def test_every_path_gives_the_same_answers(packages, records, serve, triton, broker, ray_cluster,
                                           parity_report, capsys) -> None:
    groups = []
    for w in WORKLOADS:
        pkg = packages[w]
        settings = settings_for(broker, topics(broker))
        paths: list[PathSpec] = package_paths(pkg, settings)
        paths += [
            serve_v1_path(serve.url, w, timeout_s=300),
            oip_path("serve-v2", pkg, settings, serve.hostport, "http", pkg.name),
            oip_path("triton-grpc", pkg, settings, triton.grpc_url, "grpc", f"{pkg.name}_cpu"),
            batch_path(pkg, settings),
            stream_path(pkg, settings, timeout_s=300),
        ]
        groups.append(run_paths(paths, records[w][0]))
    runs = ordered(merge_runs(groups))
    doc = describe(runs, records)
    parity_report.update(doc)
    with capsys.disabled():
        print(f"\n{doc['matrix']}")
        print("seconds per path: " + ", ".join(f"{r.name} {r.seconds:.1f}" for r in runs))

    names = [r.name for r in runs]
    expected = ["torch", "onnx-fp32", "serve-v1", "serve-v2", "triton-grpc", "batch", "stream"]
    assert [n for n in names if n != "onnx-int8"] == expected
    if MODELS == "demo":
        assert "onnx-int8" in names, "the demo packages carry an int8 variant"
    failed = {r.name: r.error for r in runs if r.error}
    assert not failed, f"paths failed: {failed}\n{doc['matrix']}"

    n_records = sum(len(r[0]) for r in records.values())
    want_codes = {rid: code for _, broken in records.values() for rid, code in broken.items()}
    for run in runs:
        assert len(run.results) == n_records, f"{run.name} answered {len(run.results)} of {n_records} records"
        codes = {rid: res.error.code for rid, res in run.results.items() if res.error is not None}
        assert codes == want_codes, f"{run.name}: rejected records and reason codes differ from the expected"
    bad = {pair: cell for pair, cell in doc["pairs"].items() if not cell["passed"]}
    assert not bad, f"pairs out of tolerance: {json.dumps(bad, indent=1)}\n{doc['matrix']}"
    assert doc["passed"]
    # Every pair compared every good record: nothing was skipped as an error on both sides by accident.
    n_good = n_records - len(want_codes)
    assert all(cell["compared"] == n_good for cell in doc["pairs"].values())


def test_int8_variant_on_a_trained_model(records, parity_report, tmp_path, capsys) -> None:
    """int8 within its tolerance (probabilities within 0.15, labels agreeing
    on at least 99% of records) against PyTorch and ONNX fp32, on a trained
    model.  With MMPIPE_PARITY_MODELS=demo the matrix above has int8 for
    every workload already; this checks the retail model either way."""
    from pipeline.spec import load_workload
    from pipeline.tooling.demo import cached_package

    src, _ = cached_package(load_workload("retail"))
    pkg = load_package(shutil.copytree(src, tmp_path / "retail"))
    assert "onnx-int8" in pkg.manifest.variants
    runs = ordered(run_paths(package_paths(pkg, settings_for()), records["retail"][0]))
    assert [r.name for r in runs] == ["torch", "onnx-fp32", "onnx-int8"]
    doc = describe(runs, {"retail": records["retail"]})
    doc["models"] = "demo"
    parity_report["int8"] = doc
    with capsys.disabled():
        print(f"\nint8 on the trained retail model:\n{doc['matrix']}")
    assert not any(r.error for r in runs), [r.error for r in runs]
    assert doc["passed"], doc["matrix"]
    int8 = {pair: cell for pair, cell in doc["pairs"].items() if "onnx-int8" in pair}
    assert len(int8) == 2 and all(c["max_score_diff"] > 0 for c in int8.values()), \
        "int8 computed exactly the fp32 numbers: the variant is not quantised"


# -- mmpipe verify, as a user runs it -------------------------------------------------------------------------------
def run_verify(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from pipeline.tooling.cli import main

    try:
        rc = main(["--log-level", "WARNING", "verify", *args])
    except SystemExit as exc:  # argparse and the command's own refusals
        rc = exc.code if isinstance(exc.code, int) else 2
    return rc, capsys.readouterr().out


@contextlib.contextmanager
def external_stream(broker: KafkaBroker, package: Path, tmp: Path, name: str) -> Iterator[tuple[str, str, str]]:
    """``mmpipe stream`` (the real command, a subprocess) on fresh topics,
    with the given package; yields the topics once it owns the partitions."""
    names = topics(broker)
    proc = StreamProc(stream_settings(broker, package, names), tmp, name)
    try:
        proc.wait_event("partitions_assigned", 120)
        yield names
    finally:
        proc.signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            proc.kill()


def test_mmpipe_verify_with_batch_and_a_running_stream(packages, serve, triton, broker, ray_cluster, tmp_path,
                                                       capsys) -> None:
    """Every path a user can name, through the command: exit 0 and a report
    with each of them."""
    pkg = packages["retail"]
    out = tmp_path / "verify.json"
    with external_stream(broker, pkg.root, tmp_path, "stream-same") as (t_in, t_out, t_dlq):
        rc, text = run_verify([
            str(pkg.root), "-n", "12", "--no-torch", "--batch",
            "--kafka", broker.bootstrap, "--kafka-input", t_in, "--kafka-output", t_out, "--kafka-dlq", t_dlq,
            "--kafka-external", "--timeout", "180",
            "--serve-url", serve.url, "--triton-url", triton.grpc_url, "--triton-model", f"{pkg.name}_cpu",
            "--json", str(out),
        ], capsys)
    assert rc == 0, text
    doc = json.loads(out.read_text())
    # Every exported variant is checked in process: the demo packages carry int8 too.
    variants = {"onnx-fp32", "onnx-int8"} if MODELS == "demo" else {"onnx-fp32"}
    assert set(doc["paths"]) == variants | {"serve-v1", "serve-v2", "triton-grpc", "batch", "stream"}
    assert all(p["results"] == 12 and p["failed"] is None for p in doc["paths"].values()), doc["paths"]
    assert doc["passed"] and f"12 records, {len(doc['paths'])} paths: PASS" in text


def test_mmpipe_verify_catches_a_stream_running_another_model(packages, broker, tmp_path, capsys) -> None:
    """The check can fail: a ``mmpipe stream`` serving another model of the
    same workload (the demo's trained retail model) disagrees with the
    package being verified, and the command says which path and exits 3."""
    from pipeline.spec import load_workload
    from pipeline.tooling.demo import cached_package

    other, _ = cached_package(load_workload("retail"))
    pkg = packages["retail"]
    if MODELS == "demo":  # the same model then: compare with the tiny one instead
        pytest.skip("with MMPIPE_PARITY_MODELS=demo the verified package is the demo model itself")
    out = tmp_path / "verify.json"
    with external_stream(broker, other, tmp_path, "stream-other") as (t_in, t_out, t_dlq):
        rc, text = run_verify([
            str(pkg.root), "-n", "12", "--no-torch", "--kafka", broker.bootstrap, "--kafka-input", t_in,
            "--kafka-output", t_out, "--kafka-dlq", t_dlq, "--kafka-external", "--timeout", "180",
            "--json", str(out),
        ], capsys)
    assert rc == 3, text
    doc = json.loads(out.read_text())
    cell = doc["pairs"]["onnx-fp32 | stream"]
    assert not cell["passed"] and cell["missing"] == 0 and cell["max_score_diff"] > 1e-4, cell
    assert "FAIL" in text and "!" in text
