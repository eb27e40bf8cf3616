"""The Open Inference Protocol codec: JSON and binary tensors, BYTES, errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from pipeline import oip
from pipeline.oip import OipError, RequestedOutput, Spec

NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]


def _sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(7)
    dt = oip.DATATYPES[datatype]
    if datatype == "BYTES":
        flat = [b"", b"plain", "caf\u00e9".encode(), b'{"id": "r1"}', b"x" * 300, b"tab\tnew\nline"]
        return np.array(flat[: int(np.prod(shape))], dtype=object).reshape(shape)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt)
    return rng.standard_normal(shape).astype(dt)


def _body(inputs: list[dict], outputs: list[dict] | None = None, **extra) -> bytes:
    req = {"inputs": inputs, **extra}
    if outputs is not None:
        req["outputs"] = outputs
    return json.dumps(req).encode()


# -- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_round_trip(datatype: str, binary: bool) -> None:
    arr = _sample(datatype)
    body, hlen = oip.encode_infer_request({"x": arr, "ids": np.arange(4, dtype=np.int64)}, binary=binary)
    assert (hlen is not None) == binary
    req = oip.parse_infer_request(body, hlen)
    got = req.inputs["x"]
    assert got.dtype == oip.DATATYPES[datatype] and got.shape == arr.shape
    assert got.tolist() == arr.tolist()
    assert req.inputs["ids"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_response_round_trip_mixed_binary_and_json(datatype: str) -> None:
    a, b = _sample(datatype), np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
    body, hlen = oip.build_infer_response(
        "m", "7", {"a": a, "b": b}, requested=[RequestedOutput("b", False), RequestedOutput("a", True)],
        request_id="r-1",
    )
    assert hlen is not None
    head = json.loads(body[:hlen])
    assert head["model_name"] == "m" and head["model_version"] == "7" and head["id"] == "r-1"
    assert [t["name"] for t in head["outputs"]] == ["b", "a"]  # requested order
    assert "data" in head["outputs"][0] and head["outputs"][1]["parameters"]["binary_data_size"] > 0
    out = oip.parse_infer_response(body, hlen)
    assert out["a"].tolist() == a.tolist() and out["b"].tolist() == b.tolist()


def test_response_all_json_has_no_header_length() -> None:
    body, hlen = oip.build_infer_response("m", "1", {"y": np.ones((1, 2), np.float32)})
    assert hlen is None
    assert json.loads(body)["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}]


def test_nested_json_data_and_request_fields() -> None:
    body = _body(
        [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [3, 4]]}],
        [{"name": "o", "parameters": {"binary_data": False}}, {"name": "p"}],
        id="abc", parameters={"binary_data_output": True},
    )
    req = oip.parse_infer_request(body)
    assert req.inputs["x"].tolist() == [[1.0, 2.5], [3.0, 4.0]] and req.id == "abc"
    # Outputs without their own binary_data follow the request-level default.
    assert req.outputs == [RequestedOutput("o", False), RequestedOutput("p", True)] and req.binary_output


def test_empty_tensors() -> None:
    body, hlen = oip.encode_infer_request({"x": np.zeros((0, 3), np.float32)}, binary=True)
    assert oip.parse_infer_request(body, hlen).inputs["x"].shape == (0, 3)
    body = _body([{"name": "x", "datatype": "INT64", "shape": [0], "data": []}])
    assert oip.parse_infer_request(body).inputs["x"].shape == (0,)


def test_bytes_serialization() -> None:
    arr = np.array([b"a", "\u00e9", b""], dtype=object)
    raw = oip.serialize_bytes(arr)
    assert raw == struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + "\u00e9".encode() + struct.pack("<I", 0)
    assert oip.deserialize_bytes(raw, 3).tolist() == [b"a", "\u00e9".encode(), b""]
    with pytest.raises(OipError, match="ends after 2 of 3"):
        oip.deserialize_bytes(raw[:-4] + b"zz", 3)
    with pytest.raises(OipError, match="cannot hold 1000000000 BYTES elements"):
        oip.deserialize_bytes(raw, 10**9)  # refused before allocating
    with pytest.raises(OipError, match="past the end"):
        oip.deserialize_bytes(struct.pack("<I", 10) + b"abc", 1)
    with pytest.raises(OipError, match="left over"):
        oip.deserialize_bytes(raw + b"zz", 3)


def test_bytes_json_must_be_strings() -> None:
    with pytest.raises(OipError, match="BYTES data must be strings"):
        oip.parse_infer_request(_body([{"name": "r", "datatype": "BYTES", "shape": [1], "data": [1]}]))


def test_bytes_output_that_is_not_utf8_needs_binary() -> None:
    out = {"e": np.array([[b"\xff"]], dtype=object)}
    with pytest.raises(OipError, match="binary_data"):
        oip.build_infer_response("m", "1", out)
    body, hlen = oip.build_infer_response("m", "1", out, binary_output=True)
    assert oip.parse_infer_response(body, hlen)["e"].tolist() == [[b"\xff"]]


def test_tritonclient_requests_and_responses() -> None:
    """The official client's wire format, both ways (the server side is tested live in test_serve)."""
    http = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    recs = np.array([[b'{"id": "a"}'], [b"\xff\xfe"]], dtype=object)
    half = np.linspace(-1, 1, 8, dtype=np.float16).reshape(2, 4)
    inputs = []
    for name, arr, dt, binary in (("ids", ids, "INT64", True), ("RECORD", recs, "BYTES", True),
                                  ("h", half, "FP16", False)):
        inp = http.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    outputs = [http.InferRequestedOutput("o1"), http.InferRequestedOutput("o2", binary_data=False)]
    body, hlen = _get_inference_request(inputs, "req-9", outputs, 0, False, False, 0, None, None)
    req = oip.parse_infer_request(body, hlen)
    assert req.id == "req-9" and req.outputs == [RequestedOutput("o1", True), RequestedOutput("o2", False)]
    assert req.inputs["ids"].tolist() == ids.tolist() and req.inputs["RECORD"].tolist() == recs.tolist()
    assert req.inputs["h"].tolist() == half.tolist()
    # No outputs listed: tritonclient asks for all of them in binary.
    body, hlen = _get_inference_request(inputs[:1], "", None, 0, False, False, 0, None, None)
    assert oip.parse_infer_request(body, hlen).binary_output

    resp, rlen = oip.build_infer_response("m", "1", {"o1": ids, "o2": half, "o3": recs},
                                          requested=[*req.outputs, RequestedOutput("o3", True)])
    result = http.InferResult.from_response_body(resp, header_length=rlen)
    assert result.as_numpy("o1").tolist() == ids.tolist()
    assert result.as_numpy("o2").tolist() == half.tolist()
    assert result.as_numpy("o3").tolist() == recs.tolist()


# -- request errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "hlen", "match"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (_body([{"datatype": "FP32", "shape": [1], "data": [1]}]), None, "needs a 'name'"),
        (_body([{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]), None, "unsupported datatype 'FP8'"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]), None, "negative"),
        (_body([{"name": "x", "datatype": "FP32", "shape": "2", "data": [1]}]), None, "list of integers"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]), None, "2 elements for shape"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]), None, "ragged|elements"),
        (_body([{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2.5]}]), None, "INT64 takes integers"),
        (_body([{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]), None, "true/false"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]), None, "takes numbers"),
        (_body([{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]), None, "out of range for INT8"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [1]}]), None, "neither 'data' nor"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}] * 2), None, "given twice"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]), None,
         "no Inference-Header-Content-Length"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"shared_memory_region": "r"}}]),
         None, "shared-memory"),
        (_body([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
               [{"name": "o", "parameters": {"classification": 3}}]), None, "classification"),
    ],
)
def test_request_errors(body: bytes, hlen: int | None, match: str) -> None:
    with pytest.raises(OipError, match=match) as ei:
        oip.parse_infer_request(body, hlen)
    assert ei.value.status == 400


def test_binary_size_errors() -> None:
    head = _body([{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}])
    with pytest.raises(OipError, match="binary_data_size is 4 bytes; shape \\[2\\] of FP32 needs 8"):
        oip.parse_infer_request(head + b"\0" * 4, len(head))
    with pytest.raises(OipError, match="runs past the end"):
        oip.parse_infer_request(head + b"\0" * 2, len(head))
    head = _body([{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}])
    with pytest.raises(OipError, match="no input claims"):
        oip.parse_infer_request(head + b"\0" * 6, len(head))
    for bad in ("x", -1, len(head) + 99):
        with pytest.raises(OipError, match="Inference-Header-Content-Length"):
            oip.parse_infer_request(head + b"\0" * 4, bad)


# -- signatures --------------------------------------------------------------------------------------
SIG = [Spec("input_ids", "int64", ["batch", "sequence"]), Spec("attention_mask", "int64", ["batch", "sequence"]),
       Spec("pixel_values", "float32", ["batch", 3, 8, 8]), Spec("presence", "float32", ["batch", 2])]


def _feeds(b: int = 2, s: int = 5) -> dict[str, np.ndarray]:
    return {"input_ids": np.ones((b, s), np.int64), "attention_mask": np.ones((b, s), np.int64),
            "pixel_values": np.zeros((b, 3, 8, 8), np.float32), "presence": np.ones((b, 2), np.float32)}


def test_validate_inputs_returns_variable_dims() -> None:
    assert oip.validate_inputs(_feeds(3, 7), SIG) == {"batch": 3, "sequence": 7}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda f: f.pop("presence"), "input 'presence' is missing"),
        (lambda f: f.update(extra=np.zeros(1)), "unexpected input 'extra'"),
        (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "input 'input_ids': datatype INT32, "
                                                                         "expected INT64"),
        (lambda f: f.update(presence=np.ones((2,), np.float32)), "input 'presence': shape \\[2\\] has rank 1, "
                                                                 "expected shape \\[-1, 2\\]"),
        (lambda f: f.update(pixel_values=np.zeros((2, 1, 8, 8), np.float32)),
         "input 'pixel_values': shape \\[2, 1, 8, 8\\], expected \\[-1, 3, 8, 8\\]"),
        (lambda f: f.update(attention_mask=np.ones((2, 4), np.int64)),
         "input 'attention_mask': dimension 1 \\(sequence\\) is 4, but input 'input_ids' has 5"),
        (lambda f: f.update(presence=np.ones((3, 2), np.float32)), "dimension 0 \\(batch\\) is 3"),
    ],
)
def test_validate_inputs_names_the_input_and_what_was_expected(change, match: str) -> None:
    feeds = _feeds()
    change(feeds)
    with pytest.raises(OipError, match=match) as ei:
        oip.validate_inputs(feeds, SIG)
    assert ei.value.status == 400


def test_validate_inputs_batch_limits() -> None:
    with pytest.raises(OipError, match="at least 1"):
        oip.validate_inputs(_feeds(0), SIG)
    with pytest.raises(OipError, match="exceeds") as ei:
        oip.validate_inputs(_feeds(5), SIG, max_batch=4)
    assert ei.value.status == 413


def test_metadata_and_datatypes() -> None:
    assert oip.tensor_metadata("x", "float32", ["batch", "sequence", 5]) == {
        "name": "x", "datatype": "FP32", "shape": [-1, -1, 5]}
    assert oip.datatype_of(np.dtype("S3")) == oip.datatype_of("object") == "BYTES"
    assert oip.datatype_of(np.float16) == "FP16"
    with pytest.raises(OipError):
        oip.datatype_of(np.complex64)
    assert json.loads(oip.error_body("nope")) == {"error": "nope"}


# -- model configuration, raw tensors, the gRPC codec -------------------------------------------------------------
def test_model_config_is_tritons_json_form() -> None:
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    ins = [Spec("input_ids", "int64", ["batch", "sequence"]), Spec("presence", "float32", ["batch", 3])]
    outs = [Spec("tags", "float32", ["batch", "sequence", 4]), Spec("ERROR", "object", ["batch", 1])]
    cfg = oip.model_config("m", "onnxruntime_onnx", ins, outs, max_batch_size=64, preferred=[16], delay_us=5000)
    assert cfg["max_batch_size"] == 64
    assert cfg["input"] == [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]},
                            {"name": "presence", "data_type": "TYPE_FP32", "dims": [3]}]
    assert cfg["output"][1]["data_type"] == "TYPE_STRING"
    # the ModelConfig protobuf tritonclient ships takes it as it is
    msg = json_format.ParseDict(cfg, model_config_pb2.ModelConfig())
    assert msg.dynamic_batching.max_queue_delay_microseconds == 5000 and list(msg.input[0].dims) == [-1]


@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_raw_tensor_bytes_round_trip(datatype: str) -> None:
    arr = _sample(datatype)
    dt, blob = oip.tensor_to_bytes(arr)
    assert dt == datatype
    back = oip.tensor_from_bytes("x", dt, arr.shape, blob)
    assert back.shape == arr.shape and back.tolist() == arr.tolist()
    if datatype != "BYTES":
        with pytest.raises(OipError, match="binary_data_size"):
            oip.tensor_from_bytes("x", dt, (arr.shape[0] + 1, *arr.shape[1:]), blob)


def test_grpc_request_from_raw_and_typed_contents() -> None:
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2

    from deploy.serve import grpc_oip

    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    rec = np.array([[b'{"id": "a"}'], [b"\xff"]], dtype=object)
    req = service_pb2.ModelInferRequest(model_name="m")
    for name, arr in (("input_ids", ids), ("RECORD", rec)):
        req.inputs.add(name=name, datatype=oip.datatype_of(arr.dtype), shape=list(arr.shape))
        req.raw_input_contents.append(oip.tensor_to_bytes(arr)[1])
    req.outputs.add(name="tags")
    inputs, requested = grpc_oip.parse_request(req)
    assert inputs["input_ids"].tolist() == ids.tolist() and inputs["RECORD"].tolist() == rec.tolist()
    assert requested == ["tags"]
    typed = service_pb2.ModelInferRequest(model_name="m")
    t = typed.inputs.add(name="input_ids", datatype="INT64", shape=[2, 3])
    t.contents.int64_contents.extend(ids.reshape(-1).tolist())
    inputs, requested = grpc_oip.parse_request(typed)
    assert inputs["input_ids"].tolist() == ids.tolist() and requested is None
    t.contents.int64_contents.append(7)
    with pytest.raises(OipError, match=r"input 'input_ids': 7 elements for shape \[2, 3\]"):
        grpc_oip.parse_request(typed)
    short = service_pb2.ModelInferRequest(model_name="m")
    short.inputs.add(name="input_ids", datatype="INT64", shape=[2, 3])
    short.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(OipError, match="binary_data_size is 8 bytes"):
        grpc_oip.parse_request(short)
    resp = grpc_oip.infer_response("m", "1", {"tags": np.ones((2, 2), np.float32)}, "rid")
    assert resp.outputs[0].datatype == "FP32" and list(resp.outputs[0].shape) == [2, 2] and resp.id == "rid"
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [1.0] * 4


def test_ensemble_features_pad_to_the_models_length_and_zero_rejected_rows(tiny_packages) -> None:
    """Serve's NAME_ensemble and Triton's preprocess model give one fixed
    shape per request: text at max_length, a rejected record a zero row."""
    from pipeline.package import load_package
    from pipeline.predictor import Predictor
    from pipeline.records import record_bytes
    from pipeline.tooling.sample_data import generate

    pkg = load_package(tiny_packages["medical"])
    pred = Predictor(pkg, None)
    seq = pkg.spec.preprocessing.text.max_length
    good = [record_bytes(s.record) for s in generate("medical", 3, seed=4)]
    raws = [good[0], b"not json", *good[1:]]
    out = oip.ensemble_features(pred.pre, pred.decode(raws), seq)
    assert out["VALID"][:, 0].tolist() == [True, False, True, True]
    assert out["ERROR"][1, 0] == b"bad_json" and out["ERROR"][0, 0] == b""
    assert out["input_ids"].shape == (4, seq) and out["TOKEN_OFFSETS"].shape == (4, seq, 2)
    assert (out["input_ids"][1] == pred.pre.text.pad_id).all() and not out["presence"][1].any()
    ref = pred.pre.collate([pred.pre.prepare(r) for r in good])
    width = ref["input_ids"].shape[1]
    assert np.array_equal(out["input_ids"][[0, 2, 3], :width], ref["input_ids"])
    assert np.array_equal(out["attention_mask"][[0, 2, 3], :width], ref["attention_mask"])
    assert not out["attention_mask"][:, width:].any()
