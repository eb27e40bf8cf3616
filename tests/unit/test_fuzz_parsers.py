"""Property-based fuzzing of the record and request parsers every path uses.

The HTTP paths (``/v1`` record bodies, ``/v2`` Open Inference Protocol
requests, JSON and binary) and the record parser the batch job and the Kafka
consumer share: whatever the bytes, the outcome is a reason-coded rejection
(``RecordError`` / ``OipError`` / ``HttpError``) or a parsed value, never
another exception, and never an allocation the input's size does not
justify (a shape of 10^12 elements with 8 bytes of data is refused before
anything is allocated).
"""

from __future__ import annotations

import json
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.serve.ingress import HttpError, _json_records
from pipeline.config import Limits
from pipeline.errors import RecordError
from pipeline.oip import OipError, deserialize_bytes, parse_infer_request
from pipeline.records import parse_record

LIMITS = Limits(max_text_chars=2000, max_record_bytes=1 << 16, max_tabular_fields=16)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
record_keys = st.sampled_from(["id", "workload", "text", "image", "audio", "video", "tabular", "metadata", "x"])
records = st.dictionaries(record_keys, json_values, max_size=8)


def _bounded(fn, *args, limit: int = 64 << 20):
    """Run ``fn`` and check its peak Python allocation stays under ``limit``."""
    tracemalloc.start()
    try:
        return fn(*args)
    finally:
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < limit, f"{fn.__name__} allocated {peak} bytes"


@FUZZ
@given(st.one_of(st.binary(max_size=300), records.map(lambda r: json.dumps(r).encode()),
                 records.map(lambda r: json.dumps(r).encode()[: max(0, len(json.dumps(r)) - 3)])))
def test_record_parser_rejects_with_a_reason(raw: bytes) -> None:
    try:
        rec = _bounded(parse_record, raw, LIMITS)
    except RecordError as exc:
        assert exc.code.value and str(exc)
    else:
        assert rec.modalities()


@FUZZ
@given(records)
def test_record_parser_on_objects(doc: dict) -> None:
    try:
        parse_record(doc, LIMITS)
    except RecordError as exc:
        assert exc.code.value


@FUZZ
@given(st.text(min_size=2001, max_size=2100), st.binary(min_size=1, max_size=4).filter(lambda b: b[:1] >= b"\x80"))
def test_long_text_and_invalid_utf8(text: str, junk: bytes) -> None:
    try:
        parse_record({"id": "t", "workload": "retail", "text": text}, LIMITS)
        raise AssertionError("a text over the limit was accepted")
    except RecordError as exc:
        assert exc.code.value == "text_too_long"
    body = b'{"id": "u", "workload": "retail", "text": "' + junk + b'"}'
    try:
        parse_record(body, LIMITS)
    except RecordError as exc:
        assert exc.code.value in ("bad_json", "bad_record")


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), json_values)))
def test_http_record_body_parser(body: bytes) -> None:
    try:
        recs, _single = _json_records(body)
    except HttpError as exc:
        assert exc.status == 400 and exc.message
    else:
        assert isinstance(recs, list) and recs


tensor_dtypes = st.sampled_from(["FP32", "FP16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "FP64", "XX"])
shapes = st.lists(st.one_of(st.integers(min_value=-2, max_value=8), st.just(10**12), st.just(2**62)), max_size=4)


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[bytes, int | None]:
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        inp: dict = {"name": draw(st.sampled_from(["input_ids", "image", "x", ""])),
                     "datatype": draw(tensor_dtypes), "shape": draw(shapes)}
        if draw(st.booleans()):
            inp["data"] = draw(json_values)
        else:
            inp["parameters"] = {"binary_data_size": draw(st.integers(-4, 64) | st.just(10**15))}
        inputs.append(inp)
    doc = {"inputs": inputs} if draw(st.booleans()) else draw(json_values)
    header = json.dumps(doc).encode()
    tail = draw(st.binary(max_size=64))
    hlen = draw(st.one_of(st.none(), st.just(len(header)), st.integers(-5, len(header) + 80)))
    return (header + tail if hlen is not None else header), hlen


@FUZZ
@given(infer_requests())
def test_infer_request_parser(req: tuple[bytes, int | None]) -> None:
    body, hlen = req
    try:
        _bounded(parse_infer_request, body, hlen)
    except OipError as exc:
        assert str(exc)


@FUZZ
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=10**9))
def test_bytes_tensor_decoder(data: bytes, count: int) -> None:
    try:
        arr = _bounded(deserialize_bytes, data, count)
    except OipError as exc:
        assert str(exc)
    else:
        assert len(arr) == count
