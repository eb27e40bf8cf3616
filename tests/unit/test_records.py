"""Record parsing, media resolution and their reason codes."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline.config import Limits, MediaConfig
from pipeline.errors import Reason, RecordError
from pipeline.records import Record, parse_record, record_to_json, resolve_media

LIM = Limits()


def _code(fn, *a, **k) -> str:
    with pytest.raises(RecordError) as ei:
        fn(*a, **k)
    return ei.value.code.value


def test_parses_json_bytes_str_and_dict() -> None:
    d = {"id": "a", "workload": "retail", "text": "red shirt"}
    for raw in (json.dumps(d).encode(), json.dumps(d), d):
        rec = parse_record(raw, LIM)
        assert rec.id == "a" and rec.modalities() == ["text"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", Reason.BAD_JSON),
        (b"\xff\xfe\x00", Reason.BAD_JSON),
        (b"[1, 2]", Reason.BAD_RECORD),
        (b'{"workload": "retail", "text": "x"}', Reason.BAD_RECORD),
        (b'{"id": "a", "workload": "retail", "text": 5}', Reason.BAD_RECORD),
        (b'{"id": "a", "workload": "retail", "colour": "red"}', Reason.BAD_RECORD),
        (b'{"id": "a", "workload": "retail"}', Reason.NO_MODALITY),
        (b'{"id": "a", "workload": "retail", "text": ""}', Reason.NO_MODALITY),
        (b'{"id": "a", "workload": "retail", "tabular": {"price": "cheap"}}', Reason.BAD_RECORD),
        (b'{"id": "", "workload": "retail", "text": "x"}', Reason.BAD_RECORD),
        (b"[" * 100000 + b"]" * 100000, Reason.BAD_RECORD),
    ],
)
def test_bad_envelopes_get_reason_codes(raw: bytes, code: Reason) -> None:
    assert _code(parse_record, raw, LIM) in (code.value, Reason.BAD_JSON.value)


def test_non_finite_tabular_rejected() -> None:
    assert _code(parse_record, {"id": "a", "workload": "w", "tabular": {"p": float("nan")}}, LIM) == "bad_record"


def test_limits_checked_before_decoding() -> None:
    small = Limits(max_text_chars=10, max_record_bytes=100, max_tabular_fields=1)
    assert _code(parse_record, {"id": "a", "workload": "w", "text": "x" * 11}, small) == "text_too_long"
    assert _code(parse_record, b"{" + b" " * 200 + b"}", small) == "payload_too_large"
    rec = {"id": "a", "workload": "w", "tabular": {"a": 1.0, "b": 2.0}}
    assert _code(parse_record, rec, small) == "tabular_invalid"


def test_error_messages_never_quote_content() -> None:
    secret = "PATIENT-JOHN-DOE-1970"
    with pytest.raises(RecordError) as ei:
        parse_record({"id": "a", "workload": "w", "text": secret * 1000}, Limits(max_text_chars=50))
    assert secret not in str(ei.value)


def test_media_base64_and_bytes() -> None:
    assert resolve_media(b"abc", "image", LIM, MediaConfig()) == b"abc"
    assert resolve_media(base64.b64encode(b"abc").decode(), "image", LIM, MediaConfig()) == b"abc"
    assert _code(resolve_media, "not base64!", "image", LIM, MediaConfig()) == "bad_base64"
    tiny = Limits(max_audio_bytes=10)
    assert _code(resolve_media, base64.b64encode(b"x" * 100).decode(), "audio", tiny, MediaConfig()) == (
        "audio_too_large"
    )
    assert _code(resolve_media, b"x" * 11, "audio", tiny, MediaConfig()) == "audio_too_large"


def test_media_uri_rules(tmp_path) -> None:
    f = tmp_path / "img.bin"
    f.write_bytes(b"hello")
    media = MediaConfig(allowed_uri_schemes=["file"], uri_root=tmp_path)
    assert resolve_media(f"file://{f}", "image", LIM, media) == b"hello"
    assert _code(resolve_media, f"file://{tmp_path}/missing", "image", LIM, media) == "uri_not_found"
    assert _code(resolve_media, "file:///etc/hostname", "image", LIM, media) == "uri_not_allowed"
    assert _code(resolve_media, f"file://{tmp_path}/../x", "image", LIM, media) == "uri_not_allowed"
    assert _code(resolve_media, f"file://{f}", "image", LIM, MediaConfig(allowed_uri_schemes=[])) == (
        "uri_not_allowed"
    )
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 100)
    assert _code(resolve_media, f"file://{big}", "video", Limits(max_video_bytes=50), media) == "video_too_large"


def test_record_json_round_trip() -> None:
    rec = Record(id="a", workload="retail", image=b"\x89PNG", text="t")
    back = Record.model_validate(record_to_json(rec))
    assert base64.b64decode(back.image) == b"\x89PNG"
