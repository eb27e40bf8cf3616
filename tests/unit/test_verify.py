"""Cross-path comparison logic, and `mmpipe verify` on a real exported package."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from exporters.onnx_export import export_package
from pipeline.predictor import Predictor
from pipeline.records import ErrorInfo, HeadResult, LabelScore, Result
from pipeline.tooling.cli import main
from pipeline.tooling.verify import PathRun, PathSpec, compare, format_matrix, report, run_paths


def _res(rid: str, label: str, score: float, *, error: str | None = None) -> Result:
    if error:
        return Result(id=rid, model="m", model_version="1", error=ErrorInfo(code=error, message="x"))
    other = "b" if label == "a" else "a"
    head = HeadResult(type="multiclass", labels=[LabelScore(label=label, score=score)],
                      scores={label: score, other: 1 - score})
    return Result(id=rid, model="m", model_version="1", heads={"h": head})


def _run(name: str, variant: str, *results: Result) -> PathRun:
    return PathRun(name, variant, {r.id: r for r in results})


def test_identical_paths_pass() -> None:
    a = _run("a", "fp32", _res("1", "a", 0.9), _res("2", "b", 0.8), _res("3", "", 0, error="image_decode"))
    b = _run("b", "fp32", _res("1", "a", 0.9 + 5e-5), _res("2", "b", 0.8), _res("3", "", 0, error="image_decode"))
    cell = compare(a, b)
    assert cell.passed and cell.compared == 2 and cell.label_agreement == 1.0


def test_score_drift_fails_fp32_but_passes_int8() -> None:
    a = _run("a", "fp32", _res("1", "a", 0.9))
    b = _run("b", "fp32", _res("1", "a", 0.95))
    assert not compare(a, b).passed
    assert compare(a, _run("q", "int8", _res("1", "a", 0.95))).passed


def test_label_flip_missing_record_and_error_mismatch_fail() -> None:
    ref = _run("ref", "fp32", _res("1", "a", 0.9), _res("2", "a", 0.9))
    flipped = _run("x", "fp32", _res("1", "b", 0.9), _res("2", "a", 0.9))
    lost = _run("y", "fp32", _res("1", "a", 0.9))
    rejected = _run("z", "fp32", _res("1", "a", 0.9), _res("2", "", 0, error="engine"))
    assert compare(ref, flipped).label_agreement == 0.5 and not compare(ref, flipped).passed
    assert compare(ref, lost).missing == 1 and not compare(ref, lost).passed
    assert compare(ref, rejected).error_mismatch == 1 and not compare(ref, rejected).passed
    text = format_matrix([ref, lost])
    assert "LOST 1" in text


def test_a_failing_path_is_reported_not_raised() -> None:
    def boom(records: object) -> list[Result]:
        raise ConnectionError("server down")

    ok = PathSpec("ok", "fp32", lambda recs: [_res("1", "a", 0.9)])
    runs = run_paths([ok, PathSpec("down", "fp32", boom)], ["r"])
    rep = report(runs)
    assert not rep["passed"] and "server down" in rep["paths"]["down"]["failed"]
    assert "down: FAILED" in format_matrix(runs)


@pytest.fixture(scope="module")
def exported_retail(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("verify") / "retail"
    shutil.copytree(tiny_packages["retail"], dst)
    export_package(dst, ("fp32",))
    return dst


def test_mmpipe_verify_passes_on_an_exported_package(exported_retail: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "verify.json"
    assert main(["verify", str(exported_retail), "-n", "24", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["paths"]) == {"torch", "onnx-fp32"} and rep["passed"]
    assert rep["paths"]["torch"]["results"] == 24
    assert "torch" in capsys.readouterr().out


def test_mmpipe_verify_needs_two_paths(tiny_packages: dict[str, Path]) -> None:
    with pytest.raises(SystemExit, match="fewer than two paths"):
        main(["verify", str(tiny_packages["retail"]), "-n", "4"])


# -- reading each path's own output back as Results ------------------------------------------------------------
def _same(got: list[Result], want: list[Result]) -> None:
    """Same ids, errors, labels and scores (timings aside)."""
    by_id = {r.id: r for r in got}
    assert set(by_id) == {r.id for r in want}
    for w in want:
        g = by_id[w.id]
        assert (g.error.code if g.error else None) == (w.error.code if w.error else None), w.id
        assert g.heads == w.heads and g.model == w.model and g.model_version == w.model_version


def _sample(workload: str = "retail") -> list:
    from pipeline.tooling import sample_data

    good = [s.record for s in sample_data.generate(workload, 6, seed=5, missing_rate=0.3)]
    broken = [r for r, _ in sample_data.broken_records(workload, 5) if isinstance(r, dict) and "id" in r][:4]
    return good + broken


def test_record_bytes_is_what_every_wire_carries() -> None:
    from pipeline.records import Record, record_bytes

    rec = {"id": "a", "workload": "retail", "text": "shirt", "image": b"\x89PNG..", "tabular": {"price": 2.0}}
    doc = json.loads(record_bytes(rec))
    assert doc["image"] == base64.b64encode(b"\x89PNG..").decode() and doc["tabular"] == {"price": 2.0}
    assert record_bytes(b'{"id": "broken') == b'{"id": "broken'  # broken stays broken, byte for byte
    assert json.loads(record_bytes(Record(id="b", workload="retail", text="x")))["id"] == "b"


def test_batch_rows_read_back_as_the_predictors_results(exported_retail: Path, tmp_path: Path) -> None:
    """Decode and infer stages of the job (called directly, without Ray),
    written as the job writes them, read back by read_as_results."""
    import numpy as np

    from pipeline.batch.inputs import open_filesystem, plan_shards
    from pipeline.batch.output import RunOutput, read_as_results
    from pipeline.batch.stages import InferActor, decode_shards, settings_json
    from pipeline.config import EngineConfig, Settings
    from pipeline.package import load_package
    from pipeline.records import record_bytes

    recs = _sample()
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(record_bytes(r) + b"\n" for r in recs))
    settings = Settings(engine=EngineConfig(kind="onnxruntime", threads=1))
    fs, path = open_filesystem(str(src))
    shards = plan_shards(fs, path, shard_bytes=1 << 30)
    rows = [s.row() for s in shards]
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    sj = settings_json(settings)
    digest = load_package(exported_retail).digest
    out = RunOutput(tmp_path / "out", "2026-05-01", "retail")
    out.open(resume=False)
    actor = InferActor(sj, str(exported_retail), digest, out.data_dir, out.uri)
    pieces = [actor(b) for b in decode_shards(batch, settings_json=sj, package_dir=str(exported_retail),
                                              digest=digest, input_uri=path)]
    files = [{"name": str(n), "size": int(z), "rows": int(r)}
             for p in pieces for n, z, r in zip(p["name"], p["size"], p["rows"], strict=True) if r]
    assert sum(f["rows"] for f in files) == len(recs)
    out.commit([{"shard": shards[0].key, "files": files}], {})
    out.close()
    pred = Predictor.from_settings(settings, str(exported_retail))
    _same(read_as_results(tmp_path / "out"), pred.predict(recs))


def test_stream_messages_read_back_as_the_predictors_results(exported_retail: Path) -> None:
    from pipeline.config import EngineConfig, Settings
    from pipeline.records import record_bytes
    from pipeline.stream.stages import InMessage, PredictStage, result_of_message

    recs = _sample()
    pred = Predictor.from_settings(Settings(engine=EngineConfig(kind="onnxruntime", threads=1)), str(exported_retail))
    msgs = [InMessage("in", 0, i, r["id"].encode(), record_bytes(r)) for i, r in enumerate(recs)]
    outs = PredictStage(pred, "out", "dlq")(msgs)
    assert {o.kind for o in outs} == {"result", "dlq"}
    got = [result_of_message(o.key, o.value, o.headers, dead_letter=o.kind == "dlq") for o in outs]
    _same(got, pred.predict(recs))


class _FakeV1(BaseHTTPRequestHandler):
    """Answers a batch per record, and a lone non-JSON body with 400 bad_json,
    as the Serve ingress does: what serve_v1_path must turn into Results."""

    def do_POST(self) -> None:  # http.server's name for it
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            doc = json.loads(body)
        except ValueError:
            status, out = 400, {"error": {"code": "bad_json", "message": "body is not valid JSON"}}
        else:
            status = 200
            out = {"results": [_res(r["id"], "a", 0.9).model_dump() for r in doc["records"]]}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_serve_v1_sends_batches_and_non_json_alone() -> None:
    from pipeline.tooling.verify import serve_v1_path

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeV1)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        path = serve_v1_path(f"http://127.0.0.1:{srv.server_address[1]}", "retail", chunk=2)
        got = path.run([{"id": "1", "image": b"\x00"}, b'{"id": "2", "text": "unterminated', {"id": "3"},
                        {"id": "4"}])
    finally:
        srv.shutdown()
    # An unparseable record has no id on any path (the Predictor's error result has id "" too).
    assert [r.id for r in got] == ["", "1", "3", "4"]
    assert got[0].error is not None and got[0].error.code == "bad_json" and all(r.ok for r in got[1:])


def test_merge_runs_pools_packages_and_id_problems_are_counted() -> None:
    from pipeline.tooling.verify import id_problems, merge_runs

    a1, a2 = _run("a", "fp32", _res("1", "a", 0.9)), _run("a", "fp32", _res("2", "a", 0.8))
    b1 = _run("b", "fp32", _res("1", "a", 0.9))
    b2 = PathRun("b", "fp32", error="down")
    merged = {r.name: r for r in merge_runs([[a1, b1], [a2, b2]])}
    assert set(merged["a"].results) == {"1", "2"} and merged["b"].error == "down"
    with pytest.raises(ValueError, match="serves"):
        merge_runs([[a1], [_run("a", "int8")]])
    assert id_problems([{"id": "x"}, {"id": "x"}, {"text": "no id"}, b"not json", {"id": "y"}]) == (2, 2)


def test_paths_that_build_their_own_engine_pin_the_variant(exported_retail: Path) -> None:
    from pipeline.config import EngineConfig, Settings
    from pipeline.package import load_package
    from pipeline.tooling.verify import _pinned

    pkg = load_package(exported_retail)
    s, v = _pinned(Settings(), pkg)
    assert (s.engine.kind, s.engine.variant, v) == ("onnxruntime", "fp32", "fp32")
    s, v = _pinned(Settings(engine=EngineConfig(kind="onnxruntime", variant="int8")), pkg)
    assert (s.engine.variant, v) == ("int8", "int8")
    s, v = _pinned(Settings(engine=EngineConfig(kind="triton")), pkg)
    assert (s.engine.kind, v) == ("triton", "fp32")
    assert Settings().engine.kind == "auto", "the caller's settings are left alone"


# -- generated text -------------------------------------------------------------------------------------
def _gen(rid: str, text: str | None, *, error: str | None = None, gen_error: str | None = None) -> Result:
    from pipeline.records import GeneratedText

    if error:
        return _res(rid, "", 0, error=error)
    res = _res(rid, "a", 0.9)
    res.generated = GeneratedText(text=text, finish_reason="stop" if text else None,
                                  error=ErrorInfo(code=gen_error, message="x") if gen_error else None)
    return res


def test_generated_text_is_compared_record_by_record() -> None:
    from pipeline.tooling.verify import compare_generated, format_generation, generation_report

    ref = _run("generate", "fp32", _gen("1", "pleural effusion."), _gen("2", "pulmonary nodule."),
               _gen("3", None, error="bad_json"), _res("4", "", 0, error="bad_record"))
    same = _run("batch", "fp32", _gen("1", "pleural effusion."), _gen("2", "pulmonary nodule."),
                _gen("3", None, error="bad_json"), _gen("4", None, gen_error="bad_record"))
    swapped = _run("stream", "fp32", _gen("1", "pulmonary nodule."), _gen("2", "pleural effusion."),
                   _gen("3", None, error="bad_json"), _gen("4", None, gen_error="bad_record"))
    untexted = _run("plain", "fp32", _res("1", "a", 0.9), _gen("2", "pulmonary nodule."),
                    _gen("3", None, error="bad_json"), _gen("4", None, gen_error="bad_record"))
    cell = compare_generated(ref, same)
    assert cell.passed and cell.compared == 4 and cell.text_agreement == 1.0
    assert compare_generated(ref, swapped).text_agreement == 0.5 and not compare_generated(ref, swapped).passed
    assert compare_generated(ref, untexted).missing == 1 and not compare_generated(ref, untexted).passed
    assert compare_generated(ref, _run("int8", "int8", *same.results.values())).passed
    rep = generation_report([ref, same, swapped])
    assert not rep["passed"] and rep["pairs"]["generate | batch"]["passed"]
    assert rep["paths"]["batch"] == {"variant": "fp32", "texts": 2, "errors": 2, "failed": None}
    shown = json.dumps(rep) + format_generation([ref, same, swapped])
    assert "effusion" not in shown and "nodule" not in shown, "counts only: the text is record content"


class _FakeGenerate(BaseHTTPRequestHandler):
    """Answers ``{"records": [...]}`` with one result per record, and a lone
    non-JSON body with 400 bad_json: the documented /v1/{workload}/generate."""

    def do_POST(self) -> None:  # http.server's name for it
        assert self.path == "/v1/medical/generate"
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            doc = json.loads(body)
        except ValueError:
            status, out = 400, {"error": {"code": "bad_json", "message": "body is not valid JSON"}}
        else:
            status = 200
            out = {"results": [{"id": r["id"], "model": "m", "model_version": "1", "text": f"text {r['id']}",
                                "finish_reason": "stop"} for r in doc["records"]]}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_serve_generate_reads_text_per_record() -> None:
    from pipeline.tooling.verify import serve_generate_path

    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeGenerate)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        path = serve_generate_path(f"http://127.0.0.1:{srv.server_address[1]}", "medical", chunk=2)
        got = path.run([{"id": "1"}, b'{"id": "2", "text": "unterminated', {"id": "3"}, {"id": "4"}])
    finally:
        srv.shutdown()
    assert [r.id for r in got] == ["", "1", "3", "4"]
    assert got[0].error is not None and got[0].error.code == "bad_json"
    assert [r.generated.text for r in got[1:] if r.generated] == ["text 1", "text 3", "text 4"]


def test_verify_generate_needs_a_generative_head(tiny_packages: dict[str, Path]) -> None:
    with pytest.raises(SystemExit, match="has no exported generative head"):
        main(["verify", str(tiny_packages["retail"]), "--generate", "-n", "2"])
