"""The Triton path against a real tritonserver (the one nvidia-pytriton ships).

One server per module, on loopback ports, serving a repository written by
``exporters.triton_repo`` for two workloads: medical (text + image + audio,
a token head) and retail (text + image + tabular).  The wheel has only the
python backend, so the server loads ``NAME_cpu`` / ``NAME_preprocess`` /
``NAME_ensemble_cpu``, plus ``NAME`` and ``NAME_ensemble`` through a
python-based stand-in for the onnxruntime backend (see
``triton_server.install_onnxruntime_standin``).  Checked:

* tensors over HTTP (binary and JSON) and gRPC give the local onnxruntime
  session's labels and scores;
* the ensembles take raw record bytes, give the Predictor's scores, and a
  broken record gets its reason code while the records beside it answer;
* the metrics endpoint is scrapeable;
* a Predictor with the TritonEngine gives the PyTorch Predictor's results;
* the engine retries only what is worth retrying;
* no record content reaches the server log.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.compare import PROB_TOL, assert_same
from tests.integration import triton_server as ts

try:
    ts.find_dist()
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
except (ts.TritonUnavailable, ImportError) as exc:  # only a missing install skips; everything else fails
    pytest.skip(f"Triton tests need nvidia-pytriton and tritonclient[grpc,http]: {exc}", allow_module_level=True)

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from exporters.triton_repo import DEPLOY_DIR, build_triton_repo, repository_models
from pipeline.config import EngineConfig
from pipeline.engines import create_engine
from pipeline.engines.triton_engine import TritonEngine, TritonEngineError, TritonUnavailable
from pipeline.package import ModelPackage, load_package
from pipeline.postprocess import head_result, sigmoid, softmax
from pipeline.predictor import Predictor
from pipeline.preprocess import Preprocessor
from pipeline.records import ErrorInfo, Result, json_safe, record_bytes
from pipeline.tooling import sample_data

WORKLOADS = ("medical", "retail")


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelPackage]:
    root = tmp_path_factory.getbasetemp() / "triton-onnx-packages"
    return {w: load_package(ts.onnx_package(tiny_packages[w], root)) for w in WORKLOADS}


@pytest.fixture(scope="module")
def server(packages: dict[str, ModelPackage], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ts.TritonServer]:
    work = tmp_path_factory.mktemp("triton")
    repo = work / "repo"
    models: list[str] = []
    for pkg in packages.values():
        # Small preferred sizes so the few concurrent test requests can batch.
        # Small preferred sizes and a 20 ms queue window, so the test's
        # concurrent requests are visibly batched.
        build_triton_repo(pkg.root, repo, max_batch_size=32, preferred_batch_sizes=(4, 8),
                          max_queue_delay_us=20_000, preprocess_instance_count=1)
        which = repository_models(pkg.name)
        models += which["cpu"] + [pkg.name, f"{pkg.name}_ensemble"]
    with ts.served(ts.start_server(repo, sorted(set(models)), work,
                                   onnxruntime_standin=DEPLOY_DIR / "onnxruntime_cpu" / "model.py")) as srv:
        yield srv


@pytest.fixture(scope="module")
def records() -> dict[str, dict[str, list]]:
    """Per workload: good records (dicts with raw media, and their JSON bytes)
    and broken ones (JSON bytes) with the reason code each must get."""
    out = {}
    for w in WORKLOADS:
        good = [s.record for s in sample_data.generate(w, 12, seed=31, missing_rate=0.3)]
        broken = [(record_bytes(r), code)
                  for r, code in sample_data.broken_records(w, seed=2)]
        out[w] = {"good": good, "good_json": [json.dumps(json_safe(r)).encode() for r in good], "broken": broken}
    return out


@pytest.fixture(scope="module")
def ort_predictors(packages: dict[str, ModelPackage]) -> dict[str, Predictor]:
    return {w: Predictor(p, create_engine(p, EngineConfig(kind="onnxruntime", device="cpu")))
            for w, p in packages.items()}


@pytest.fixture(scope="module")
def torch_predictors(packages: dict[str, ModelPackage]) -> dict[str, Predictor]:
    return {w: Predictor(p, create_engine(p, EngineConfig(kind="torch", device="cpu"))) for w, p in packages.items()}


# -- helpers -------------------------------------------------------------------------------------------------
def probs(head_type: str, logits: np.ndarray) -> np.ndarray:
    return sigmoid(logits) if head_type == "multilabel" else softmax(logits)




def infer_tensors(server: ts.TritonServer, how: str, model: str, feeds: dict[str, np.ndarray],
                  outputs: list[str]) -> dict[str, np.ndarray]:
    """One request with tritonclient: ``http-binary``, ``http-json`` or ``grpc``."""
    if how == "grpc":
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for n, a in feeds.items():
            inp = grpcclient.InferInput(n, list(a.shape), "INT64" if a.dtype == np.int64 else "FP32")
            inp.set_data_from_numpy(a)
            inputs.append(inp)
        res = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                           client_timeout=30)
    else:
        binary = how == "http-binary"
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
        inputs = []
        for n, a in feeds.items():
            inp = httpclient.InferInput(n, list(a.shape), "INT64" if a.dtype == np.int64 else "FP32")
            inp.set_data_from_numpy(a, binary_data=binary)
            inputs.append(inp)
        res = client.infer(model, inputs,
                           outputs=[httpclient.InferRequestedOutput(o, binary_data=binary) for o in outputs])
    try:
        return {o: res.as_numpy(o) for o in outputs}
    finally:
        client.close()


def infer_records(server: ts.TritonServer, protocol: str, model: str, raws: list[bytes],
                  outputs: list[str]) -> dict[str, np.ndarray]:
    """Raw record bytes to an ensemble: RECORD is [batch, 1] TYPE_STRING."""
    data = np.array(raws, dtype=np.object_).reshape(-1, 1)
    mod = grpcclient if protocol == "grpc" else httpclient
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(server.grpc_url)
    else:
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=30)
    inp = mod.InferInput("RECORD", list(data.shape), "BYTES")
    if protocol == "grpc":
        inp.set_data_from_numpy(data)
        res = client.infer(model, [inp], outputs=[mod.InferRequestedOutput(o) for o in outputs], client_timeout=60)
    else:
        inp.set_data_from_numpy(data, binary_data=True)
        res = client.infer(model, [inp], outputs=[mod.InferRequestedOutput(o, binary_data=True) for o in outputs])
    try:
        return {o: res.as_numpy(o) for o in outputs}
    finally:
        client.close()


# -- tensors in, logits out ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["http-binary", "http-json", "grpc"])
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("suffix", ["_cpu", ""], ids=["python-backend", "onnxruntime-config"])
def test_tensors_match_local_onnxruntime(server, packages, records, ort_predictors, workload, how, suffix) -> None:
    pkg = packages[workload]
    pre = Preprocessor(pkg.spec, pkg.text_encoder())
    prepared = [pre.prepare(r) for r in records[workload]["good"]]
    feeds = pre.collate(prepared)
    heads = {h.name: h for h in pkg.spec.heads}
    got = infer_tensors(server, how, pkg.name + suffix, feeds, list(heads))
    want = ort_predictors[workload].engine.run(feeds)
    for name, head in heads.items():
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(probs(head.type, got[name]), probs(head.type, want[name]), atol=PROB_TOL, rtol=0)
        for i, p in enumerate(prepared):  # labels, spans and scores as results
            offsets = p.offsets if head.type == "token" else None
            g, w = head_result(head, got[name][i], offsets), head_result(head, want[name][i], offsets)
            assert [ls.label for ls in g.labels] == [ls.label for ls in w.labels]
            assert (g.spans is None) == (w.spans is None)
            if w.spans:
                assert [(s.start, s.end, s.label) for s in g.spans] == [(s.start, s.end, s.label) for s in w.spans]


def scrape(server: ts.TritonServer, metric: str, model: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    m = re.search(rf'^{metric}\{{model="{re.escape(model)}",[^}}]*\}} (\S+)$', text, flags=re.M)
    return float(m.group(1)) if m else 0.0


def test_dynamic_batching_merges_requests_of_different_lengths(server, packages, records, ort_predictors) -> None:
    """Concurrent one-record requests with different text lengths are run in
    fewer executions (Triton's dynamic batcher) and each still gets its own
    answer, token logits cut back to its own length."""
    pkg = packages["medical"]
    model = f"{pkg.name}_cpu"
    pre = Preprocessor(pkg.spec, pkg.text_encoder())
    singles = [pre.collate([pre.prepare(r)]) for r in records["medical"]["good"]] * 2
    assert len({f["input_ids"].shape[1] for f in singles}) > 2
    heads = [h.name for h in pkg.spec.heads]
    execs0, reqs0 = (scrape(server, m, model) for m in ("nv_inference_exec_count", "nv_inference_request_success"))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results: list = [None] * len(singles)

    def done(i: int):
        return lambda result, error: results.__setitem__(i, error or result)

    requests = []
    for feeds in singles:
        inputs = []
        for n, a in feeds.items():
            inp = grpcclient.InferInput(n, list(a.shape), "INT64" if a.dtype == np.int64 else "FP32")
            inp.set_data_from_numpy(a)
            inputs.append(inp)
        requests.append(inputs)
    outputs = [grpcclient.InferRequestedOutput(h) for h in heads]
    try:
        for i, inputs in enumerate(requests):  # all sent back to back
            client.async_infer(model, inputs, done(i), outputs=outputs, client_timeout=60)
        deadline = time.monotonic() + 60
        while any(r is None for r in results) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.close()
    for feeds, res in zip(singles, results, strict=True):
        assert res is not None and not isinstance(res, Exception), res
        want = ort_predictors["medical"].engine.run(feeds)
        for h in pkg.spec.heads:
            got = res.as_numpy(h.name)
            assert got.shape == want[h.name].shape
            np.testing.assert_allclose(probs(h.type, got), probs(h.type, want[h.name]), atol=PROB_TOL, rtol=0)
    deadline = time.monotonic() + 5  # statistics may land just after the responses
    while (reqs := scrape(server, "nv_inference_request_success", model) - reqs0) < len(singles):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    execs = scrape(server, "nv_inference_exec_count", model) - execs0
    assert reqs == len(singles)
    # Sent back to back into a 20 ms queue window: merged whatever their lengths.
    assert execs <= reqs / 2, f"{reqs:.0f} requests ran in {execs:.0f} executions: too little dynamic batching"


# -- raw records in: the ensembles -----------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("suffix", ["_ensemble_cpu", "_ensemble"], ids=["python-backend", "onnxruntime-config"])
def test_ensemble_takes_raw_records_and_isolates_broken_ones(
    server, packages, records, ort_predictors, workload, protocol, suffix
) -> None:
    pkg = packages[workload]
    good, broken = records[workload]["good_json"], records[workload]["broken"]
    # Broken records interleaved with good ones, all in one request.
    raws: list[bytes] = []
    for i, g in enumerate(good):
        raws.append(g)
        if i < len(broken):
            raws.append(broken[i][0])
    raws += [b for b, _ in broken[len(good):]]
    want = ort_predictors[workload].predict(raws)
    heads = [h.name for h in pkg.spec.heads]
    token = any(h.type == "token" for h in pkg.spec.heads)
    outputs = [*heads, "VALID", "ERROR", "ERROR_MESSAGE"] + (["TOKEN_OFFSETS"] if token else [])
    out = infer_records(server, protocol, pkg.name + suffix, raws, outputs)
    assert out["VALID"].shape == (len(raws), 1)
    got: list[Result] = []
    for i, w in enumerate(want):
        if not out["VALID"][i, 0]:
            code, msg = out["ERROR"][i, 0].decode(), out["ERROR_MESSAGE"][i, 0].decode()
            assert code and msg
            got.append(Result(id=w.id, model=pkg.name, model_version=pkg.version,
                              error=ErrorInfo(code=code, message=msg)))
            continue
        offsets = [tuple(int(x) for x in o) for o in out["TOKEN_OFFSETS"][i]] if token else None
        got.append(Result(id=w.id, model=pkg.name, model_version=pkg.version, heads={
            h.name: head_result(h, out[h.name][i], offsets if h.type == "token" else None) for h in pkg.spec.heads
        }))
    assert_same(got, want)
    codes = [r.error.code for r in want if r.error]
    assert sorted(codes) == sorted(code for _, code in broken), "every broken record has its own reason code"
    assert sum(1 for r in want if r.ok) == len(good)


# -- metrics ----------------------------------------------------------------------------------------------
def test_metrics_endpoint_is_scrapeable(server, packages, records) -> None:
    pkg = packages["retail"]
    infer_records(server, "http", f"{pkg.name}_ensemble_cpu", records["retail"]["good_json"][:3], ["VALID"])
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    found = {m: float(v) for m, v in re.findall(r'^nv_inference_request_success\{model="([^"]+)",[^}]*\} (\S+)$',
                                                text, flags=re.M)}
    for model in (f"{pkg.name}_ensemble_cpu", f"{pkg.name}_preprocess", f"{pkg.name}_cpu"):
        assert found.get(model, 0) >= 1, f"no successful requests counted for {model}: {sorted(found)}"
    assert "# TYPE nv_inference_request_success counter" in text
    assert re.search(r"^nv_inference_queue_duration_us\{", text, flags=re.M)


# -- the TritonEngine behind a Predictor --------------------------------------------------------------------
def triton_config(**fields) -> EngineConfig:
    return EngineConfig(kind="triton", **fields)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("workload", WORKLOADS)
def test_predictor_with_triton_engine_matches_torch(
    server, packages, records, torch_predictors, workload, protocol
) -> None:
    pkg = packages[workload]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    cfg = triton_config(triton_url=url, triton_model=f"{pkg.name}_cpu", triton_protocol=protocol,
                        triton_timeout_s=30.0)
    engine = create_engine(pkg, cfg)
    assert engine.name == "triton" and engine.provider == f"triton:{protocol}://{url}/{pkg.name}_cpu"
    raws = records[workload]["good"] + [b for b, _ in records[workload]["broken"]]
    predictor = Predictor(pkg, engine, batch_size=8)
    try:
        got = predictor.predict(raws)
    finally:
        predictor.close()
    want = torch_predictors[workload].predict(raws)
    assert_same(got, want)
    assert all(r.engine == "triton" and r.provider == engine.provider for r in got)
    assert sum(r.ok for r in got) == len(records[workload]["good"])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_engine_fails_fast_on_bad_requests_and_retries_when_unavailable(server, packages, protocol) -> None:
    pkg = packages["retail"]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    sig = pkg.manifest.signature
    specs = [{"name": t.name, "dtype": t.dtype} for t in sig.inputs]
    outs = [t.name for t in sig.outputs]
    # Unknown model: a configuration error, reported at construction, not retried.
    with pytest.raises(TritonEngineError, match="not ready") as info:
        TritonEngine(url, "no-such-model", protocol=protocol, input_specs=specs, output_names=outs, retries=3)
    assert not info.value.retriable
    # A malformed batch (wrong presence width): invalid argument, one attempt only.
    engine = TritonEngine(url, f"{pkg.name}_cpu", protocol=protocol, input_specs=specs, output_names=outs,
                          retries=3, backoff_s=0.05)
    pre = Preprocessor(pkg.spec, pkg.text_encoder())
    feeds = pre.collate([pre.prepare(s.record) for s in sample_data.generate("retail", 2, seed=1)])
    assert set(engine.run(feeds)) == set(outs) and engine.attempts == 1
    feeds["presence"] = np.ones((2, 7), dtype=np.float32)
    with pytest.raises(TritonEngineError, match="presence") as info:
        engine.run(feeds)
    assert not info.value.retriable and engine.attempts == 1
    engine.close()
    # Nothing listening: retried with backoff, then a clear "unavailable".
    dead = f"127.0.0.1:{ts.free_ports(1)[0]}"
    with pytest.raises(TritonEngineError, match=r"unavailable .* after 3 attempts") as info:
        TritonEngine(dead, f"{pkg.name}_cpu", protocol=protocol, input_specs=specs, output_names=outs,
                     retries=2, backoff_s=0.01)
    assert info.value.retriable
    # A server that accepts but never answers: a timeout, not retried.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        with pytest.raises(TritonEngineError, match=r"timed out .*not retried") as info:
            TritonEngine(f"127.0.0.1:{mute.getsockname()[1]}", "m", protocol=protocol, input_specs=specs,
                         output_names=outs, timeout_s=0.5, retries=3)
        assert not info.value.retriable and not isinstance(info.value, TritonUnavailable)


# -- privacy ----------------------------------------------------------------------------------------------------
def test_server_log_has_no_record_content(server, packages, records) -> None:
    pkg = packages["medical"]
    raws = records["medical"]["good_json"] + [b for b, _ in records["medical"]["broken"]]
    infer_records(server, "grpc", f"{pkg.name}_ensemble_cpu", raws, ["VALID"])
    log = server.log_path.read_text(errors="replace")
    texts = [r["text"] for r in records["medical"]["good"] if r.get("text")]
    assert texts, "want records with text"
    for t in texts:
        assert t not in log and t[:24] not in log
    for r in records["medical"]["good"]:
        assert r["id"] not in log
