"""The Ray Serve path against a real local Ray + Serve, over real HTTP.

One ``python -m deploy.serve.cli --config serve.yaml`` process (what
``mmpipe serve`` runs) per module, on a free loopback port, serving two
applications from one Serve config:

* ``mmpipe`` at ``/``: the medical (text + image + audio, a token head) and
  retail (text + image + tabular) tiny packages, exported to ONNX;
* ``broken`` at ``/broken``: a copy of the retail package whose ONNX file
  no longer matches its checksum.

Checked: tritonclient.http (binary and JSON), plain HTTP and the
TritonEngine give the local Predictor's labels and scores; the records
ensemble and the friendly API (JSON and multipart) likewise, with a reason
code per broken record; every error status; readiness of a broken replica;
/metrics with the shared metric set, scraped by a real Prometheus whose
PromQL count matches the requests sent, and dynamic batching merging
concurrent requests; no record content in any log; SIGTERM shuts it all
down.  No wall-clock assertions.
"""

from __future__ import annotations

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

import numpy as np
import pytest
import yaml

from exporters.onnx_export import export_package
from pipeline.config import EngineConfig
from pipeline.engines import create_engine
from pipeline.engines.triton_engine import TritonEngine
from pipeline.package import ModelPackage, load_package
from pipeline.postprocess import head_result
from pipeline.predictor import Predictor
from pipeline.records import Result, json_safe, record_bytes
from pipeline.tooling import sample_data
from tests.compare import assert_same
from tests.integration.prometheus import PrometheusServer, prometheus_binary
from tests.integration.serve_helpers import Server, free_port, running_serve, serve_app

pytest.importorskip("ray.serve", reason="Serve tests need ray[serve]")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the ONNX export of the tiny packages
httpclient = pytest.importorskip("tritonclient.http")
requests = pytest.importorskip("requests")

ROOT = Path(__file__).resolve().parents[2]
WORKLOADS = ("medical", "retail")
MAX_BODY = 4 << 20
MAX_RECORDS = 64
MARKER = "zebra-quartz-7731"
"""Record text that must never appear in any log."""


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package_dirs(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ONNX-exported copies of the tiny packages, plus a tampered one."""
    root = tmp_path_factory.mktemp("serve-packages")
    out = {}
    for w in WORKLOADS:
        out[w] = root / w
        shutil.copytree(tiny_packages[w], out[w])
        export_package(out[w], ("fp32",))
    out["broken"] = root / "broken"
    shutil.copytree(out["retail"], out["broken"])
    onnx = out["broken"] / "onnx" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    return out


@pytest.fixture(scope="module")
def packages(package_dirs: dict[str, Path]) -> dict[str, ModelPackage]:
    return {w: load_package(package_dirs[w]) for w in WORKLOADS}


def _app(name: str, prefix: str, models: list[dict], deployments: list[str]) -> dict:
    return serve_app(name, prefix, models, deployments, settings={
        "log_level": "DEBUG", "limits": {"max_request_bytes": MAX_BODY, "max_batch_records": MAX_RECORDS}})


@pytest.fixture(scope="module")
def server(package_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    apps = [
        _app("mmpipe", "/", [{"package": str(package_dirs[w])} for w in WORKLOADS],
             ["medical-fusion", "retail-fusion"]),
        _app("broken", "/broken", [{"package": str(package_dirs["broken"])}], ["retail-fusion"]),
    ]
    with running_serve(apps, tmp_path_factory.mktemp("serve")) as srv:
        yield srv


@pytest.fixture(scope="module")
def predictors(packages: dict[str, ModelPackage]) -> dict[str, Predictor]:
    return {w: Predictor(p, create_engine(p, EngineConfig(kind="onnxruntime", device="cpu", threads=1)))
            for w, p in packages.items()}


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    out = {}
    for w in WORKLOADS:
        good = [s.record for s in sample_data.generate(w, 10, seed=41, missing_rate=0.3)]
        good[0] = {**good[0], "text": f"{good[0].get('text') or 'note'} {MARKER}"}
        out[w] = good
    return out


# -- helpers -----------------------------------------------------------------------------------------------


def results_from_logits(pred: Predictor, ids: list[str], logits: dict[str, np.ndarray],
                        offsets: list[list[tuple[int, int]]]) -> list[Result]:
    """Results built from served logits with the package's own postprocessing."""
    out = []
    for i, rid in enumerate(ids):
        heads = {h.name: head_result(h, logits[h.name][i], offsets[i] if h.type == "token" else None)
                 for h in pred.spec.heads}
        out.append(Result(id=rid, model=pred.package.name, model_version=pred.package.version, heads=heads))
    return out


def tc_infer(server: Server, model: str, feeds: dict[str, np.ndarray], outputs: list[str] | None, *,
             binary: bool, version: str = "") -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(server.hostport, network_timeout=60)
    try:
        inputs = []
        for n, a in feeds.items():
            dt = "BYTES" if a.dtype == object else {"int64": "INT64", "float32": "FP32", "int32": "INT32"}[str(a.dtype)]
            inp = httpclient.InferInput(n, list(a.shape), dt)
            inp.set_data_from_numpy(a, binary_data=binary)
            inputs.append(inp)
        outs = None if outputs is None else [httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs]
        return client.infer(model, inputs, outputs=outs, model_version=version)
    finally:
        client.close()


def scrape(server: Server) -> str:
    r = requests.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


# -- health and metadata -----------------------------------------------------------------------------------
def test_health_and_metadata(server: Server, packages: dict[str, ModelPackage]) -> None:
    client = httpclient.InferenceServerClient(server.hostport)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
        for pkg in packages.values():
            assert client.is_model_ready(pkg.name) and client.is_model_ready(f"{pkg.name}_ensemble")
            assert client.is_model_ready(pkg.name, pkg.version)
            meta = client.get_model_metadata(pkg.name)
            sig = pkg.manifest.signature
            assert meta["versions"] == [pkg.version] and meta["platform"] == "onnxruntime_onnx"
            assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [
                (t.name, "INT64" if t.dtype == "int64" else "FP32") for t in sig.inputs]
            assert [t["shape"] for t in meta["inputs"]] == [
                [d if isinstance(d, int) else -1 for d in t.shape] for t in sig.inputs]
            assert [t["name"] for t in meta["outputs"]] == [t.name for t in sig.outputs]
            ens = client.get_model_metadata(f"{pkg.name}_ensemble")
            assert ens["inputs"] == [{"name": "RECORD", "datatype": "BYTES", "shape": [-1, 1]}]
            names = [t["name"] for t in ens["outputs"]]
            assert names[: len(sig.outputs)] == [t.name for t in sig.outputs]
            assert names[len(sig.outputs):][:3] == ["VALID", "ERROR", "ERROR_MESSAGE"]
        assert not client.is_model_ready("no-such-model")
    finally:
        client.close()


# -- tensors in, logits out ----------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_tritonclient_tensors_match_predictor(server, packages, predictors, records, workload, binary) -> None:
    pred = predictors[workload]
    prepared = [pred.prepare(r) for r in records[workload]]
    feeds = pred.pre.collate(prepared)
    outputs = [t.name for t in packages[workload].manifest.signature.outputs]
    res = tc_infer(server, packages[workload].name, feeds, outputs, binary=binary)
    logits = {o: res.as_numpy(o) for o in outputs}
    for o in outputs:
        assert logits[o].shape == pred.engine.run(feeds)[o].shape  # token heads: this request's own length
    got = results_from_logits(pred, [p.id for p in prepared], logits, [p.offsets for p in prepared])
    assert_same(got, pred.predict(records[workload]))
    # No outputs named: all of them, in binary (tritonclient's default); a version path works too.
    res = tc_infer(server, packages[workload].name, feeds, None, binary=binary, version=packages[workload].version)
    assert {t["name"] for t in res.get_response()["outputs"]} == set(outputs)
    assert all("binary_data_size" in t["parameters"] for t in res.get_response()["outputs"])


def test_plain_http_json_matches_predictor(server, packages, predictors, records) -> None:
    pred, pkg = predictors["retail"], packages["retail"]
    prepared = [pred.prepare(r) for r in records["retail"]]
    feeds = pred.pre.collate(prepared)
    body = {"id": "plain-1", "inputs": [
        {"name": n, "shape": list(a.shape), "datatype": "INT64" if a.dtype == np.int64 else "FP32",
         "data": a.tolist()} for n, a in feeds.items()]}
    r = requests.post(f"{server.url}/v2/models/{pkg.name}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["model_name"] == pkg.name and resp["model_version"] == pkg.version and resp["id"] == "plain-1"
    logits = {t["name"]: np.array(t["data"], dtype=np.float32).reshape(t["shape"]) for t in resp["outputs"]}
    got = results_from_logits(pred, [p.id for p in prepared], logits, [p.offsets for p in prepared])
    assert_same(got, pred.predict(records["retail"]))


def test_triton_engine_against_serve(server, packages, predictors, records) -> None:
    """The Predictor's own Triton engine, pointed at Ray Serve instead of Triton."""
    for w in WORKLOADS:
        pkg = packages[w]
        sig = pkg.manifest.signature
        engine = TritonEngine(server.hostport, pkg.name, protocol="http", timeout_s=60,
                              input_specs=[{"name": t.name, "dtype": t.dtype} for t in sig.inputs],
                              output_names=[t.name for t in sig.outputs])
        remote = Predictor(pkg, engine)
        try:
            assert_same(remote.predict(records[w]), predictors[w].predict(records[w]))
        finally:
            remote.close()


# -- raw records -----------------------------------------------------------------------------------------------
def _broken(workload: str) -> list[tuple[bytes | dict, str]]:
    cases = list(sample_data.broken_records(workload, seed=2))
    cases.append(({"id": f"{workload}-uri", "workload": workload, "image": "file:///etc/hostname"},
                  "uri_not_allowed"))
    return cases


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_ensemble_records(server, packages, predictors, records, workload, binary) -> None:
    pred, pkg = predictors[workload], packages[workload]
    good = [json.dumps(json_safe(r)).encode() for r in records[workload]]
    broken = [(record_bytes(r), c) for r, c in _broken(workload)]
    if not binary:  # JSON carries BYTES as UTF-8 text only
        broken = [(r, c) for r, c in broken if _utf8(r)]
    raws = [good[0], *(r for r, _ in broken), *good[1:]]
    data = np.array(raws, dtype=object).reshape(-1, 1)
    outputs = [t.name for t in pkg.manifest.signature.outputs] + ["VALID", "ERROR"]
    has_tokens = any(h.type == "token" for h in pkg.spec.heads)
    if has_tokens:
        outputs.append("TOKEN_OFFSETS")
    res = tc_infer(server, f"{pkg.name}_ensemble", {"RECORD": data}, outputs, binary=binary)
    valid = res.as_numpy("VALID").reshape(-1)
    # tritonclient gives BYTES as bytes from binary data and as str from JSON (as with Triton).
    errors = np.array([e.decode() if isinstance(e, bytes) else e for e in res.as_numpy("ERROR").reshape(-1)])
    codes = list(errors[1 : 1 + len(broken)])
    assert codes == [c for _, c in broken] and not valid[1 : 1 + len(broken)].any()
    ok = [0, *range(1 + len(broken), len(raws))]
    assert valid[ok].all() and not any(errors[ok])
    logits = {t.name: res.as_numpy(t.name)[ok] for t in pkg.manifest.signature.outputs}
    token_offsets = res.as_numpy("TOKEN_OFFSETS") if has_tokens else np.zeros((len(raws), 0, 2), np.int64)
    offsets = [[tuple(o) for o in token_offsets[i]] for i in ok]
    ids = [r["id"] for r in records[workload]]
    assert_same(results_from_logits(pred, ids, logits, offsets), pred.predict(records[workload]))


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("workload", WORKLOADS)
def test_friendly_json(server, predictors, records, workload) -> None:
    pred = predictors[workload]
    recs = [json_safe(r) for r in records[workload]]
    # One record: one Result; the workload comes from the URL when absent.
    single = {k: v for k, v in recs[1].items() if k != "workload"}
    r = requests.post(f"{server.url}/v1/{workload}/predict", json=single, timeout=60)
    assert r.status_code == 200, r.text
    assert_same([r.json()], pred.predict([records[workload][1]]))
    # A batch with broken records: each gets its reason, the rest answer (200).
    broken = [(r.decode() if isinstance(r, bytes) else json_safe(r), c) for r, c in _broken(workload)
              if not isinstance(r, bytes) or _utf8(r)]
    batch = [recs[0], *(b for b, _ in broken), *recs[1:]]
    r = requests.post(f"{server.url}/v1/{workload}/predict", json={"records": batch}, timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(batch)
    assert [x["error"]["code"] for x in results[1 : 1 + len(broken)]] == [c for _, c in broken]
    good = [results[0], *results[1 + len(broken):]]
    assert all("error" not in x for x in good)
    assert_same(good, pred.predict(records[workload]))


def test_friendly_multipart(server, predictors, records) -> None:
    pred = predictors["medical"]
    rec = next(r for r in records["medical"] if r.get("image") and r.get("audio") and r.get("text"))
    files = {"image": ("scan.png", rec["image"], "image/png"), "audio": ("note.wav", rec["audio"], "audio/wav")}
    r = requests.post(f"{server.url}/v1/medical/predict", data={"id": rec["id"], "text": rec["text"]},
                      files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert_same([r.json()], pred.predict([rec]))
    # A broken upload is a per-record error, answered with 200.
    files = {"image": ("scan.png", b"\x89PNG\r\n\x1a\n broken", "image/png")}
    r = requests.post(f"{server.url}/v1/medical/predict", data={"id": "m-bad", "text": rec["text"]},
                      files=files, timeout=60)
    assert r.status_code == 200 and r.json()["error"]["code"] == "image_corrupt", r.text


# -- errors ---------------------------------------------------------------------------------------------------
def test_malformed_json_is_400(server, packages) -> None:
    name = packages["retail"].name
    r = requests.post(f"{server.url}/v2/models/{name}/infer", data=b'{"inputs": [', timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = requests.post(f"{server.url}/v1/retail/predict", data=b'{"id": "x", ', timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"


def test_wrong_dtype_and_shape_are_400_naming_the_input(server, packages, predictors, records) -> None:
    pred = predictors["medical"]
    feeds = pred.pre.collate([pred.prepare(r) for r in records["medical"][:2]])
    name = packages["medical"].name
    bad = {**feeds, "input_ids": feeds["input_ids"].astype(np.int32)}
    with pytest.raises(Exception, match=r"\[400\] input 'input_ids': datatype INT32, expected INT64"):
        tc_infer(server, name, bad, None, binary=True)
    bad = {**feeds, "pixel_values": feeds["pixel_values"][:, :, :32]}
    with pytest.raises(Exception, match=r"\[400\] input 'pixel_values': shape \[2, 1, 32, 64\], expected "
                                        r"\[-1, 1, 64, 64\]"):
        tc_infer(server, name, bad, None, binary=False)
    bad = {k: v for k, v in feeds.items() if k != "presence"}
    with pytest.raises(Exception, match=r"\[400\] input 'presence' is missing"):
        tc_infer(server, name, bad, None, binary=True)
    bad = {**feeds, "attention_mask": feeds["attention_mask"][:, :3]}
    with pytest.raises(Exception, match=r"\[400\] input 'attention_mask': dimension 1 \(sequence\)"):
        tc_infer(server, name, bad, None, binary=True)
    with pytest.raises(Exception, match=r"\[400\] unknown output 'nope'"):
        tc_infer(server, name, feeds, ["nope"], binary=True)
    # The records ensemble takes [batch, 1] BYTES, as Triton's does.
    with pytest.raises(Exception, match=r"\[400\] input 'RECORD': shape \[2\] has rank 1"):
        tc_infer(server, f"{name}_ensemble", {"RECORD": np.array([b"{}", b"{}"], dtype=object)}, None, binary=True)


def test_unknown_model_and_workload_are_404(server) -> None:
    r = requests.post(f"{server.url}/v2/models/nope/infer", json={"inputs": []}, timeout=30)
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    assert requests.get(f"{server.url}/v2/models/nope", timeout=30).status_code == 404
    assert requests.get(f"{server.url}/v2/models/retail-fusion/versions/999/ready", timeout=30).status_code == 404
    r = requests.post(f"{server.url}/v1/nope/predict", json={"id": "a", "text": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_workload"


def test_unsupported_media_type_is_415(server) -> None:
    r = requests.post(f"{server.url}/v1/retail/predict", data=b"red shirt", timeout=30,
                      headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = requests.post(f"{server.url}/v2/models/retail-fusion/infer", files={"x": b"1"}, timeout=30)
    assert r.status_code == 415
    r = requests.post(f"{server.url}/v2/models/retail-fusion/infer", data=b"{}", timeout=30,
                      headers={"Content-Type": "application/json", "Content-Encoding": "br"})
    assert r.status_code == 415


def test_oversize_body_is_413(server) -> None:
    big = b"x" * (MAX_BODY + 1)
    # Refused from Content-Length ...
    r = requests.post(f"{server.url}/v1/retail/predict", data=big, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = requests.post(f"{server.url}/v2/models/retail-fusion/infer", data=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == f"request body is {MAX_BODY + 1} bytes; limit is {MAX_BODY}"

    # ... and while streaming a chunked body that declares no length.
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    r = requests.post(f"{server.url}/v2/models/retail-fusion/infer", data=chunks(), timeout=60)
    assert r.status_code == 413 and r.json()["error"] == f"request body exceeds {MAX_BODY} bytes"
    # Too many records in one request.
    recs = [{"id": f"r{i}", "text": "shirt"} for i in range(MAX_RECORDS + 1)]
    r = requests.post(f"{server.url}/v1/retail/predict", json={"records": recs}, timeout=60)
    assert r.status_code == 413


def test_broken_package_replica_is_not_ready_and_never_serves(server, packages, predictors, records) -> None:
    base = f"{server.url}/broken"
    assert requests.get(f"{base}/v2/health/live", timeout=30).status_code == 200
    assert requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 503
    assert requests.get(f"{base}/v2/models/retail-fusion/ready", timeout=30).status_code == 503
    assert requests.get(f"{base}/v2/models/retail-fusion_ensemble/ready", timeout=30).status_code == 503
    pred = predictors["retail"]
    feeds = pred.pre.collate([pred.prepare(r) for r in records["retail"][:2]])
    body = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "INT64" if a.dtype == np.int64 else "FP32",
                        "data": a.tolist()} for n, a in feeds.items()]}
    r = requests.post(f"{base}/v2/models/retail-fusion/infer", json=body, timeout=30)
    assert r.status_code == 503 and "not ready" in r.json()["error"]
    r = requests.post(f"{base}/v1/retail/predict", json=json_safe(records["retail"][0]), timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    # The healthy application beside it is unaffected.
    assert requests.get(f"{server.url}/v2/health/ready", timeout=30).status_code == 200


# -- metrics and batching -------------------------------------------------------------------------------------
def _batch_hist(text: str, model: str) -> tuple[float, float]:
    """(observations of batch size 1, all observations) of mmpipe_batch_size for a model."""
    ones = total = 0.0
    for line in text.splitlines():
        if line.startswith("mmpipe_batch_size_bucket") and f'model="{model}"' in line and 'le="1.0"' in line:
            ones += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mmpipe_batch_size_count") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return ones, total


def test_dynamic_batching_merges_concurrent_requests(server, records) -> None:
    recs = [json_safe(r) for r in records["retail"]]
    statuses: list[int] = []

    def one(i: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        r = requests.post(f"{server.url}/v1/retail/predict", json=recs[i % len(recs)], timeout=120)
        statuses.append(r.status_code)

    for _round in range(3):  # concurrency is up to the OS scheduler; a few rounds make it certain enough
        barrier = threading.Barrier(16)
        threads = [threading.Thread(target=one, args=(i, barrier)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        merged = False
        for _ in range(40):  # replicas push metrics to the ingress asynchronously
            ones, total = _batch_hist(scrape(server), "retail-fusion")
            if total > ones:
                merged = True
                break
            time.sleep(0.25)
        if merged:
            break
    assert statuses and set(statuses) == {200}
    assert merged, "no engine call ever saw more than one record"


def test_metrics_endpoint(server) -> None:
    text = ""
    for _ in range(40):
        text = scrape(server)
        if 'mmpipe_model_info{' in text and 'model="medical-fusion"' in text:
            break
        time.sleep(0.25)
    for family in ("mmpipe_records_total", "mmpipe_record_errors_total", "mmpipe_stage_seconds_bucket",
                   "mmpipe_request_seconds_bucket", "mmpipe_batch_size_bucket", "mmpipe_model_info",
                   "mmpipe_queue_depth"):
        assert re.search(rf'^{family}{{[^}}]*path="online"', text, re.M), family
    info = [ln for ln in text.splitlines() if ln.startswith("mmpipe_model_info{")]
    assert any('engine="onnxruntime"' in ln and 'provider="CPUExecutionProvider"' in ln
               and 'model="medical-fusion"' in ln for ln in info)
    assert re.search(r'^mmpipe_record_errors_total{[^}]*reason="uri_not_allowed"', text, re.M)
    assert re.search(r'^mmpipe_stage_seconds_count{[^}]*stage="queue"', text, re.M)
    assert 'replica="retail-fusion#' in text


def _ok_records(text: str, workload: str) -> float:
    """sum(mmpipe_records_total{path="online", workload=W, outcome="ok"}) over replicas, from /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("mmpipe_records_total{") and 'path="online"' in line
                and f'workload="{workload}"' in line and 'outcome="ok"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """Debian's prometheus binary, installed when missing if we are root with apt-get."""
    binary, why = prometheus_binary()
    if binary is None:
        pytest.skip(why)
    return binary


def test_prometheus_scrapes_the_request_count(server, prometheus_bin, records) -> None:
    """A real Prometheus scrapes /metrics every second; PromQL gives the count this test sent."""
    workload, n = "medical", 7
    promql = f'sum(mmpipe_records_total{{path="online", workload="{workload}", outcome="ok"}})'
    # Earlier tests' records are still being pushed by the replica: wait until /metrics is steady.
    before, steady = -1.0, 0
    for _ in range(60):
        now = _ok_records(scrape(server), workload)
        steady = steady + 1 if now == before else 0
        before = now
        if steady >= 3:
            break
        time.sleep(0.5)
    prom = PrometheusServer(prometheus_bin, server.hostport)
    prom.start()
    try:
        def prom_value() -> float | None:
            result = prom.query(promql)
            return float(result[0]["value"][1]) if result else None

        def wait_for(want: float) -> float | None:
            got = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                got = prom_value()
                if got == want or (want == 0 and got is None):
                    return want
                time.sleep(0.5)
            return got

        seen = wait_for(before)
        assert seen == before, (f"prometheus never saw the starting count {before} (last {seen}); "
                                f"targets: {prom.targets()}\n{prom.log}")
        for rec in records[workload][1 : 1 + n]:
            single = {k: v for k, v in json_safe(rec).items() if k != "workload"}
            r = requests.post(f"{server.url}/v1/{workload}/predict", json=single, timeout=60)
            assert r.status_code == 200 and "error" not in r.json(), r.text
        seen = wait_for(before + n)
        assert seen == before + n, (f"{promql} = {seen}, expected {before} + {n}; /metrics says "
                                    f"{_ok_records(scrape(server), workload)}; targets: {prom.targets()}")
        up = prom.query(f'up{{job="{prom.job}"}}')
        assert [float(u["value"][1]) for u in up] == [1.0]
    finally:
        prom.stop()


# -- privacy and shutdown (keep last) ---------------------------------------------------------------------------
def test_no_record_content_in_logs(server) -> None:
    files = [server.log, *(p for p in server.ray_tmp.rglob("*") if p.is_file())]
    assert len(files) > 3
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        assert MARKER.encode() not in data, f"record text leaked into {f}"


def test_sigterm_shuts_down_cleanly(server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(120) == 0, server.log.read_text()[-4000:]
    assert "stopping" in server.log.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v2/health/live", timeout=5)


def test_a_config_that_fails_to_deploy_exits_1(package_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The builder's refusal (two models for one workload) comes back from the
    Serve controller as the command's error, and Ray is shut down."""
    models = [{"package": str(package_dirs["medical"]), "name": "a", "workload": "retail"},
              {"package": str(package_dirs["retail"]), "name": "b", "workload": "retail"}]
    config = {"http_options": {"host": "127.0.0.1", "port": free_port()},
              "applications": [_app("dup", "/", models, [])]}
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmr", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "deploy.serve.cli", "--config", str(cfg), "--num-cpus", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command's own session: the Ray daemons it started
        out, err = proc.communicate(timeout=10)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert "both serve workload 'retail'" in err
