"""The one record shape (Kafka value, HTTP body, batch row) and the result shape.

Media fields (``image``, ``audio``, ``video``) hold raw ``bytes`` in Python;
in JSON they are either base64 text or a URI with a scheme
(``file:///data/x.png``, ``s3://bucket/key``).  Base64 never contains ``:``,
so the presence of ``://`` decides unambiguously.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import Limits, MediaConfig
from pipeline.errors import Reason, RecordError

MEDIA_FIELDS = ("image", "audio", "video")
MODALITY_FIELDS = ("text", "image", "audio", "video", "tabular")

_MEDIA_LIMIT = {
    "image": ("max_image_bytes", Reason.IMAGE_TOO_LARGE),
    "audio": ("max_audio_bytes", Reason.AUDIO_TOO_LARGE),
    "video": ("max_video_bytes", Reason.VIDEO_TOO_LARGE),
}


class Message(BaseModel):
    """One turn of a conversation about a record (text only)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str = Field(min_length=1)


class Record(BaseModel):
    """An input record.  At least one modality must be present.

    ``messages``: an optional conversation for a generative head, oldest
    first, ending with the user's question; earlier turns are the context a
    follow-up is answered in.  Heads that tag ignore it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    workload: str = Field(min_length=1, max_length=64)
    text: str | None = None
    image: bytes | str | None = None
    audio: bytes | str | None = None
    video: bytes | str | None = None
    tabular: dict[str, float] | None = None
    metadata: dict[str, Any] | None = None
    messages: list[Message] | None = Field(None, max_length=256)

    @field_validator("tabular")
    @classmethod
    def _finite(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            for key, val in v.items():
                if not math.isfinite(val):
                    raise ValueError(f"tabular field {key!r} is not a finite number")
        return v

    def modalities(self) -> list[str]:
        return [m for m in MODALITY_FIELDS if getattr(self, m) not in (None, "", b"", {})]


class ErrorInfo(BaseModel):
    code: str
    message: str


class LabelScore(BaseModel):
    label: str
    score: float


class TokenSpan(BaseModel):
    """A tagged span of the input text, as character offsets (no text copied)."""

    start: int
    end: int
    label: str
    score: float


class HeadResult(BaseModel):
    type: Literal["multiclass", "multilabel", "token"]
    labels: list[LabelScore] = Field(default_factory=list, description="predicted labels")
    scores: dict[str, float] = Field(default_factory=dict, description="score of every label")
    spans: list[TokenSpan] | None = None


class GeneratedText(BaseModel):
    """What a generative head wrote for a record the tagging heads answered
    (the batch job's and the stream's results, with ``generate.enabled``).
    ``text`` is record content (patient data for medical): never logged."""

    text: str | None = Field(None, repr=False)
    finish_reason: Literal["stop", "length"] | None = None
    error: ErrorInfo | None = None


class Result(BaseModel):
    id: str
    workload: str | None = None
    model: str
    model_version: str
    engine: str | None = None
    provider: str | None = None
    heads: dict[str, HeadResult] | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    generated: GeneratedText | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "record"
    return f"field {loc!r}: {err.get('msg', 'invalid')}"


def parse_record(raw: bytes | str | dict[str, Any] | Record, limits: Limits) -> Record:
    """Turn raw input into a :class:`Record`, or raise :class:`RecordError`."""
    if isinstance(raw, Record):
        rec = raw
    else:
        if isinstance(raw, (bytes, bytearray, memoryview)):
            if len(raw) > limits.max_record_bytes:
                raise RecordError(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"record is {len(raw)} bytes; limit is {limits.max_record_bytes}",
                )
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(Reason.BAD_JSON, f"record is not UTF-8 at byte {exc.start}") from None
        if isinstance(raw, str):
            if len(raw) > limits.max_record_bytes:
                raise RecordError(Reason.PAYLOAD_TOO_LARGE, "record exceeds max_record_bytes")
            try:
                raw = json.loads(raw)
            except (json.JSONDecodeError, RecursionError) as exc:
                msg = getattr(exc, "msg", "nesting too deep")
                raise RecordError(Reason.BAD_JSON, f"record is not valid JSON: {msg}") from None
        if not isinstance(raw, dict):
            raise RecordError(Reason.BAD_RECORD, f"record must be a JSON object, got {type(raw).__name__}")
        try:
            rec = Record.model_validate(raw)
        except ValidationError as exc:
            raise RecordError(Reason.BAD_RECORD, _first_error(exc)) from None
    if not rec.modalities():
        raise RecordError(Reason.NO_MODALITY, "record carries no text, image, audio, video or tabular data")
    if rec.text is not None and len(rec.text) > limits.max_text_chars:
        raise RecordError(
            Reason.TEXT_TOO_LONG, f"text has {len(rec.text)} characters; limit is {limits.max_text_chars}"
        )
    if rec.messages and sum(len(m.content) for m in rec.messages) > limits.max_text_chars:
        raise RecordError(
            Reason.TEXT_TOO_LONG, f"messages hold more than {limits.max_text_chars} characters in all"
        )
    if rec.tabular is not None and len(rec.tabular) > limits.max_tabular_fields:
        raise RecordError(
            Reason.TABULAR_INVALID,
            f"tabular has {len(rec.tabular)} fields; limit is {limits.max_tabular_fields}",
        )
    return rec


def resolve_media(
    value: bytes | str, field: str, limits: Limits, media: MediaConfig
) -> bytes:
    """Bytes of a media field: raw, base64 or URI.  The size limit is checked
    before the bytes are read or decoded."""
    attr, reason = _MEDIA_LIMIT[field]
    max_bytes: int = getattr(limits, attr)
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif "://" in value[:32]:
        data = _read_uri(value, field, max_bytes, reason, media)
    else:
        # base64 expands 3 bytes into 4 characters: check before decoding.
        if len(value) * 3 // 4 > max_bytes + 3:
            raise RecordError(reason, f"{field} is about {len(value) * 3 // 4} bytes; limit is {max_bytes}")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(Reason.BAD_BASE64, f"{field} is neither valid base64 nor a URI") from None
    if len(data) > max_bytes:
        raise RecordError(reason, f"{field} is {len(data)} bytes; limit is {max_bytes}")
    if not data:
        raise RecordError(Reason.BAD_RECORD, f"{field} is empty")
    return data


def _read_uri(uri: str, field: str, max_bytes: int, reason: Reason, media: MediaConfig) -> bytes:
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme not in media.allowed_uri_schemes:
        raise RecordError(Reason.URI_NOT_ALLOWED, f"{field} URI scheme {scheme!r} is not allowed here")
    if scheme == "file":
        path = Path(unquote(parsed.path)).resolve()
        if media.uri_root is not None:
            root = Path(media.uri_root).resolve()
            if root != path and root not in path.parents:
                raise RecordError(Reason.URI_NOT_ALLOWED, f"{field} path is outside the allowed media root")
        try:
            size = path.stat().st_size
        except OSError:
            raise RecordError(Reason.URI_NOT_FOUND, f"{field} file does not exist or is unreadable") from None
        if size > max_bytes:
            raise RecordError(reason, f"{field} is {size} bytes; limit is {max_bytes}")
        try:
            with path.open("rb") as fh:
                return fh.read(max_bytes + 1)
        except OSError:
            raise RecordError(Reason.URI_NOT_FOUND, f"{field} file is unreadable") from None
    try:
        import fsspec  # optional: object stores through their fsspec drivers
    except ImportError:
        raise RecordError(Reason.URI_NOT_ALLOWED, f"no filesystem driver for scheme {scheme!r}") from None
    try:
        with fsspec.open(uri, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise RecordError(Reason.URI_NOT_FOUND, f"{field} object does not exist") from None
    except Exception as exc:  # driver errors vary widely; report the kind only
        raise RecordError(Reason.URI_NOT_FOUND, f"{field} could not be read ({type(exc).__name__})") from None
    if len(data) > max_bytes:
        raise RecordError(reason, f"{field} exceeds {max_bytes} bytes")
    return data


def record_to_json(rec: Record) -> dict[str, Any]:
    """JSON-safe dict of a record (media bytes become base64)."""
    out = rec.model_dump(exclude_none=True)
    for f in MEDIA_FIELDS:
        if isinstance(out.get(f), (bytes, bytearray)):
            out[f] = base64.b64encode(out[f]).decode("ascii")
    return out


def record_bytes(raw: bytes | str | dict[str, Any] | Record) -> bytes:
    """A raw record as the bytes every wire carries (a Kafka value, a JSONL
    line, an HTTP body), so a tool can send the same record down any path.

    Bytes pass through untouched (a broken record stays broken in the same
    way); a dict's media bytes become base64 and nothing else changes, so
    validation still happens where the record lands, not here."""
    if isinstance(raw, (bytes, bytearray)):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogatepass")
    return json.dumps(record_to_json(raw) if isinstance(raw, Record) else json_safe(raw),
                      separators=(",", ":")).encode()


def json_safe(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw record dict as JSON can carry it: media bytes become base64
    (the wire form every path accepts) and nothing else changes, so a record
    broken on purpose stays broken the same way."""
    return {k: base64.b64encode(v).decode("ascii") if isinstance(v, (bytes, bytearray)) else v
            for k, v in raw.items()}


def jsonl_line(raw: bytes | str | dict[str, Any] | Record) -> bytes:
    """:func:`record_bytes` as one JSONL line (no newline at the end): a raw
    newline inside bytes that are not JSON becomes a space, so a broken
    record stays one line and one record."""
    return record_bytes(raw).replace(b"\n", b" ")
