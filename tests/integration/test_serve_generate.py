"""Generation on the Ray Serve path, against a real local Ray + Serve.

One ``python -m deploy.serve.cli`` process (what ``mmpipe serve`` runs, in
Ray's throughput mode) for the module, one application serving the
generative medical package (``generative_package``: a briefly trained head
exported with ``generate-fp32``) and a retail package without a head.

Checked against in-process ``Generator(pkg).generate(records)``:
``POST /v1/medical/generate`` answered as JSON; the same route as
server-sent events read by ``curl -N`` and by requests (more than one event per
record, texts concatenating to the in-process text); ``tritonclient.grpc``'s
``start_stream`` / ``async_stream_infer`` against ``NAME_generate``
(tokens, the final-response flag, the empty final response); a multi-turn
record; a bad record among good ones; limits, unknown models and a package
without a head; no record content or generated text in the server's log.
No wall-clock assertions.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporters.onnx_export import export_package
from pipeline.config import EngineConfig, GenerateConfig
from pipeline.generate import GenerationResult, Generator
from pipeline.oip import GENERATE_OUTPUTS, GENERATE_SUFFIX, MAX_NEW_TOKENS, RECORD, token_event_fields
from pipeline.package import load_package
from pipeline.records import json_safe
from pipeline.tooling import sample_data
from tests.integration.serve_helpers import Server, running_serve, serve_app

pytest.importorskip("ray.serve", reason="Serve tests need ray[serve]")
pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")
requests = pytest.importorskip("requests")

MARKER = "zebra-quartz-7731"
"""Record text that must never appear in any log."""
MULTI_TURN = {"id": "turns-1", "workload": "medical", "text": "chest radiograph, follow-up",
              "messages": [{"role": "user", "content": "what is the impression?"},
                           {"role": "assistant", "content": "pleural effusion."},
                           {"role": "user", "content": "and the size?"}]}
BAD_URI = {"id": "bad-uri", "workload": "medical", "image": "file:///etc/hostname"}
"""Online callers may not make the server read its files: rejected, alone."""


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retail_dir(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package without a generative head."""
    out = tmp_path_factory.mktemp("gen-retail") / "retail"
    shutil.copytree(tiny_packages["retail"], out)
    export_package(out, ("fp32",))
    return out


@pytest.fixture(scope="module")
def server(generative_package: Path, retail_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    app = serve_app("mmpipe", "/", [{"package": str(generative_package)}, {"package": str(retail_dir)}],
                    settings={"log_level": "DEBUG"})
    with running_serve([app], tmp_path_factory.mktemp("serve-gen")) as srv:
        yield srv


@pytest.fixture(scope="module")
def generator(generative_package: Path) -> Generator:
    """In-process generation, as the server is configured (default settings)."""
    return Generator(load_package(generative_package), EngineConfig(kind="onnxruntime", device="cpu", threads=1),
                     GenerateConfig())


@pytest.fixture(scope="module")
def records() -> list[dict]:
    out = [json_safe(s.record) for s in sample_data.generate("medical", 5, seed=23)]
    out[0] = {**out[0], "text": f"{out[0].get('text') or 'note'} {MARKER}"}
    return [*out, MULTI_TURN]


@pytest.fixture(scope="module")
def expected(generator: Generator, records: list[dict]) -> list[GenerationResult]:
    got = generator.generate(records)
    assert all(r.ok for r in got), [r.error for r in got]
    assert len({r.text for r in got}) > 1, "the package should write different text for different records"
    return got


def _name(generative_package: Path) -> str:
    return load_package(generative_package).name


# -- helpers -----------------------------------------------------------------------------------------------
def sse_events(lines: list[str]) -> list[Any]:
    """The ``data:`` payloads of an event stream, ``[DONE]`` kept as a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def by_record(events: list[dict]) -> dict[int, dict[str, Any]]:
    """Per record index: concatenated text, token ids, finish reason, error, event count."""
    out: dict[int, dict[str, Any]] = defaultdict(lambda: {"text": "", "ids": [], "finish": None, "error": None,
                                                          "events": 0})
    for ev in events:
        r = out[ev["index"]]
        r["text"] += ev["text"]
        r["events"] += 1
        if ev["token_id"] is not None:
            r["ids"].append(ev["token_id"])
        r["finish"] = ev["finish_reason"] or r["finish"]
        r["error"] = ev["error"] or r["error"]
    return dict(out)


def assert_streamed(events: list[dict], want: list[GenerationResult]) -> None:
    got = by_record(events)
    assert sorted(got) == list(range(len(want)))
    for i, w in enumerate(want):
        assert (got[i]["text"], got[i]["ids"], got[i]["finish"]) == (w.text, w.token_ids, w.finish_reason), i
        assert got[i]["events"] > 1, "a record's tokens come as separate events"


def post(server: Server, body: Any, **kw: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/medical/generate", json=body, timeout=120, **kw)


def grpc_stream(server: Server, model: str, records: list[dict | bytes], *, max_new_tokens: int | None = None,
                empty_final: bool = False, parameters: dict | None = None, request_id: str = "r1"
                ) -> list[tuple[Any, Any]]:
    """One request on a tritonclient stream: every (result, error) the
    callback got until the request's final response (or an error)."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    raws = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in records]
    inputs = [grpcclient.InferInput(RECORD, [len(raws)], "BYTES")]
    inputs[0].set_data_from_numpy(np.array(raws, dtype=object))
    if max_new_tokens is not None:
        inputs.append(grpcclient.InferInput(MAX_NEW_TOKENS, [1], "INT32"))
        inputs[1].set_data_from_numpy(np.array([max_new_tokens], dtype=np.int32))
    out = []
    try:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=empty_final,
                                  parameters=parameters)
        while True:
            result, error = got.get(timeout=120)
            out.append((result, error))
            if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    finally:
        client.close()
    return out


def grpc_events(responses: list[tuple[Any, Any]]) -> list[dict]:
    assert all(e is None for _, e in responses), [str(e) for _, e in responses]
    events = []
    for result, _ in responses:
        resp = result.get_response()
        if not resp.outputs:  # the empty final response
            continue
        events.append(token_event_fields({n: result.as_numpy(n) for n, _ in GENERATE_OUTPUTS}))
    return events


# -- HTTP ---------------------------------------------------------------------------------------------------
def test_http_json_matches_in_process(server, records, expected) -> None:
    r = post(server, {"records": records})
    assert r.status_code == 200, r.text
    got = [GenerationResult.model_validate(d) for d in r.json()["results"]]
    assert [(g.id, g.text, g.token_ids, g.finish_reason) for g in got] == [
        (w.id, w.text, w.token_ids, w.finish_reason) for w in expected]
    # one record alone: one result object; the multi-turn record answered in context as in-process
    r = post(server, MULTI_TURN)
    assert r.status_code == 200, r.text
    one = GenerationResult.model_validate(r.json())
    assert (one.text, one.token_ids) == (expected[-1].text, expected[-1].token_ids)
    assert one.prompt_tokens == expected[-1].prompt_tokens > 1


def test_http_max_new_tokens_and_seeded_sampling(server, generator, records) -> None:
    r = post(server, {"records": records[:3], "max_new_tokens": 2})
    assert r.status_code == 200, r.text
    want = generator.generate(records[:3], max_new_tokens=2)
    assert [d["token_ids"] for d in r.json()["results"]] == [w.token_ids for w in want]
    body = {"records": records[:3], "do_sample": True, "temperature": 1.5, "top_k": 5, "seed": 7}
    a, b = post(server, body).json()["results"], post(server, body).json()["results"]
    assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b], "same seed, same tokens"


def test_sse_with_curl_streams_every_token(server, records, expected, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("curl is needed to read the event stream as an outside client")
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"records": records, "stream": True}))
    head, stream = tmp_path / "head.txt", tmp_path / "stream.txt"
    out = subprocess.run([curl, "-sS", "-N", "--fail-with-body", "-H", "Content-Type: application/json",
                          "-H", "Expect:", "-D", str(head), "-o", str(stream), "--data-binary", f"@{body}",
                          f"{server.url}/v1/medical/generate"],
                         capture_output=True, text=True, timeout=180, check=False)
    text = stream.read_text(errors="replace")
    assert out.returncode == 0, out.stderr + text[-2000:]
    assert "content-type: text/event-stream" in head.read_text().lower(), head.read_text()
    events = sse_events(text.splitlines())
    assert events, (head.read_text(), text[:2000])
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    assert_streamed(events[:-1], expected)


def test_sse_with_requests_and_accept_header(server, records, expected) -> None:
    with requests.post(f"{server.url}/v1/medical/generate", json={"records": records[:2]}, stream=True,
                       headers={"Accept": "text/event-stream"}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines(decode_unicode=True))
    events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert_streamed(events[:-1], expected[:2])


def test_bad_record_gets_its_error_the_others_their_text(server, records, expected) -> None:
    batch = [records[1], BAD_URI, {"id": "no-modality", "workload": "medical"}, records[2]]
    r = post(server, {"records": batch})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["error"]["code"] if x["error"] else None for x in res] == [None, "uri_not_allowed", "no_modality", None]
    assert [res[0]["text"], res[3]["text"]] == [expected[1].text, expected[2].text]
    assert res[1]["text"] is None and res[1]["id"] == "bad-uri"
    with requests.post(f"{server.url}/v1/medical/generate", json={"records": batch, "stream": True}, stream=True,
                       timeout=120) as s:
        lines = list(s.iter_lines(decode_unicode=True))
    events = sse_events(lines)[:-1]
    errors = {e["index"]: e["error"]["code"] for e in events if e["error"]}
    assert errors == {1: "uri_not_allowed", 2: "no_modality"}
    got = by_record(events)
    assert [got[0]["text"], got[3]["text"]] == [expected[1].text, expected[2].text]


def test_http_refusals(server, generator, records, retail_dir) -> None:
    over = generator.max_new_tokens + 1
    for stream in (False, True):
        r = post(server, {"records": records[:1], "max_new_tokens": over, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"code", "message"} and f"max_new_tokens {over} exceeds the limit" in err["message"]
    cases = [
        ({"records": records[:1], "temperature": 0}, 400, "temperature must be > 0"),
        ({"records": records[:1], "temperature": "hot"}, 400, "'temperature' must be a number"),
        ({"records": records[:1], "beams": 4}, 400, "unknown field 'beams'"),
        ({"records": []}, 400, "non-empty list"),
    ]
    for body, status, message in cases:
        r = post(server, body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    r = requests.post(f"{server.url}/v1/nope/generate", json=records[0], timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_workload"
    r = requests.post(f"{server.url}/v1/retail/generate", json={"id": "x", "workload": "retail", "text": "a"},
                      timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_generative_head", r.text
    assert "no generative head" in r.json()["error"]["message"]


# -- gRPC: ModelStreamInfer on NAME_generate -----------------------------------------------------------------------
def test_grpc_stream_matches_in_process(server, generative_package, records, expected) -> None:
    model = _name(generative_package) + GENERATE_SUFFIX
    responses = grpc_stream(server, model, records)
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in responses]
    assert finals == [False] * (len(finals) - 1) + [True], "only the last response is final"
    assert {r.get_response().id for r, _ in responses} == {"r1"}
    assert_streamed(grpc_events(responses), expected)


def test_grpc_empty_final_response_and_max_new_tokens(server, generator, generative_package, records) -> None:
    model = _name(generative_package) + GENERATE_SUFFIX
    responses = grpc_stream(server, model, records[:2], max_new_tokens=3, empty_final=True)
    last = responses[-1][0].get_response()
    assert not last.outputs and last.parameters["triton_final_response"].bool_param
    assert not any(r.get_response().parameters["triton_final_response"].bool_param for r, _ in responses[:-1])
    want = generator.generate(records[:2], max_new_tokens=3)
    got = by_record(grpc_events(responses))
    assert [got[i]["ids"] for i in range(2)] == [w.token_ids for w in want]
    assert all(len(w.token_ids) <= 3 for w in want)


def test_grpc_bad_record_and_refusals(server, generator, generative_package, records, retail_dir) -> None:
    name = _name(generative_package)
    events = grpc_events(grpc_stream(server, name + GENERATE_SUFFIX, [records[1], BAD_URI, b"{not json"]))
    got = by_record(events)
    assert got[1]["error"]["code"] == "uri_not_allowed" and got[2]["error"]["code"] == "bad_json"
    assert got[0]["error"] is None and got[0]["text"]
    over = generator.max_new_tokens + 1
    http = post(server, {"records": records[:1], "max_new_tokens": over}).json()["error"]["message"]
    retail = load_package(retail_dir).name
    cases = [
        (name + GENERATE_SUFFIX, {"max_new_tokens": over}, http),
        ("nope" + GENERATE_SUFFIX, {}, "unknown model 'nope_generate'"),
        (retail + GENERATE_SUFFIX, {}, "no generative head"),
    ]
    for model, kw, message in cases:
        ((result, error),) = grpc_stream(server, model, records[:1], **kw)
        assert result is None and error is not None and message in error.message(), (model, error)
    # a unary ModelInfer on a decoupled model is refused, as Triton does
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        inp = grpcclient.InferInput(RECORD, [1], "BYTES")
        inp.set_data_from_numpy(np.array([json.dumps(records[1]).encode()], dtype=object))
        with pytest.raises(Exception) as exc:
            client.infer(name + GENERATE_SUFFIX, [inp], client_timeout=60)
        assert exc.value.status() == "StatusCode.INVALID_ARGUMENT" and "ModelStreamInfer" in exc.value.message()
        with pytest.raises(Exception) as exc:
            client.get_model_metadata(retail + GENERATE_SUFFIX)
        assert exc.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()


def test_grpc_metadata_config_and_readiness(server, generative_package) -> None:
    name = _name(generative_package) + GENERATE_SUFFIX
    client = grpcclient.InferenceServerClient(server.grpc)
    try:
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name, as_json=True)
        assert meta["name"] == name
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [(RECORD, "BYTES"), (MAX_NEW_TOKENS, "INT32")]
        assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == list(GENERATE_OUTPUTS)
        cfg = client.get_model_config(name, as_json=True)["config"]
        assert cfg["model_transaction_policy"] == {"decoupled": True}
        assert [i.get("optional", False) for i in cfg["input"]] == [False, True]
    finally:
        client.close()
    r = requests.get(f"{server.url}/v2/models/{name}/config", timeout=30)
    assert r.status_code == 200 and r.json()["model_transaction_policy"] == {"decoupled": True}


def test_classic_proxy_mode_streams_the_same(generative_package, records, expected, tmp_path: Path) -> None:
    """With Ray's throughput mode off (Serve's Python proxy relays the
    streams) both streams give the same tokens: the module's server covers
    throughput mode, this the other."""
    app = serve_app("classic", "/", [{"package": str(generative_package)}], settings={})
    with running_serve([app], tmp_path, throughput_mode="off") as srv:
        with requests.post(f"{srv.url}/v1/medical/generate", json={"records": records[:2], "stream": True},
                           stream=True, timeout=120) as r:
            assert r.status_code == 200, r.text
            events = sse_events(list(r.iter_lines(decode_unicode=True)))
        assert events[-1] == "[DONE]"
        assert_streamed(events[:-1], expected[:2])
        assert_streamed(grpc_events(grpc_stream(srv, _name(generative_package) + GENERATE_SUFFIX, records[:2])),
                        expected[:2])


def test_generated_text_and_records_never_logged(server, expected) -> None:
    log = server.log.read_text(errors="replace")
    assert MARKER not in log
    for w in expected:
        if len(w.text or "") >= 8:  # shorter texts could be in any log by chance
            assert w.text not in log


def test_verify_compares_serve_generation_with_in_process(server, generative_package, records) -> None:
    """``mmpipe verify``'s generation paths against the real route: Serve's
    text equals in-process generation's, record by record (a broken record
    is answered by both with the same reason code)."""
    from pipeline.config import Settings
    from pipeline.tooling.verify import compare_generated, generate_path, run_paths, serve_generate_path

    pkg = load_package(generative_package)
    settings = Settings(engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1))
    runs = run_paths([generate_path(pkg, settings), serve_generate_path(server.url, pkg.spec.name)],
                     [*records, b"{not json"])
    assert all(r.error is None for r in runs), [r.error for r in runs]
    cell = compare_generated(*runs)
    assert cell.passed and cell.missing == 0 and cell.compared == len(records) + 1, cell
