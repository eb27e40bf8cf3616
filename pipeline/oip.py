"""Open Inference Protocol (KServe v2) over HTTP: the request/response codec.

One module for the wire format, shared by every server that speaks it (the
Ray Serve application today) and by tests, so "what Triton accepts" is
written down once.  Pure numpy: no web framework, no Ray.

Covered:

* JSON tensors: ``{"name", "shape", "datatype", "data"}`` with ``data``
  flat (row-major) or nested;
* the *binary tensor data* extension: the JSON header is followed by raw
  tensor bytes, its length in the ``Inference-Header-Content-Length`` HTTP
  header, each binary tensor announcing ``parameters.binary_data_size``
  (little-endian; ``BYTES`` elements as a 4-byte length + the bytes, as
  tritonclient serializes them);
* outputs as JSON or binary per output (``parameters.binary_data``) or for
  all (request parameter ``binary_data_output``), which is what
  ``tritonclient.http`` asks for by default;
* checking named tensors against a model signature, with messages that name
  the input and say what was expected (Triton's own wording is the model).

Not covered (refused with a clear 400): shared-memory tensors and the
classification extension.  Errors raise :class:`OipError`, which carries an
HTTP status; :func:`error_body` gives the protocol's ``{"error": "..."}``.
Messages describe names, shapes and datatypes, never tensor values (inputs
may be patient records).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
"""HTTP header carrying the JSON header's byte length in binary requests/responses."""

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
"""Protocol datatype -> numpy dtype (``BYTES`` tensors are object arrays of ``bytes``)."""

_BY_NUMPY = {str(dt): name for name, dt in DATATYPES.items() if name != "BYTES"}
_BY_NUMPY.update({"object": "BYTES", "string": "BYTES", "bytes": "BYTES", "str": "BYTES"})
_BY_DTYPE: dict[np.dtype, str] = {dt: name for name, dt in DATATYPES.items()}
"""The same lookup keyed by the dtype object: every request asks it once per
tensor, and ``str(dtype)`` costs more than the rest of the check."""


class OipError(ValueError):
    """A request the protocol (or the model) cannot take; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class TensorSpecLike(Protocol):
    """What a signature entry needs: ``pipeline.package.TensorSpec`` fits."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class Spec:
    """A tensor of a model signature: numpy dtype name and shape, where a
    string dimension (``batch``, ``sequence``) is variable and every input
    naming the same string must agree on it."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A parsed ``/infer`` request."""

    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None
    """outputs asked for, in order; ``None``: all of the model's"""
    binary_output: bool = False
    """request-level ``binary_data_output``: the default for outputs not listed"""
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# -- datatypes --------------------------------------------------------------------------
def datatype_of(dtype: str | np.dtype) -> str:
    """Protocol datatype of a numpy dtype (or a signature's dtype name);
    numpy bytes/str arrays are ``BYTES`` too."""
    if isinstance(dtype, np.dtype):
        known = _BY_DTYPE.get(dtype)
        if known is not None:
            return known
    elif isinstance(dtype, str) and dtype in _BY_NUMPY:
        return _BY_NUMPY[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise OipError(f"dtype {dtype!r} has no Open Inference Protocol datatype", 500) from None
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _BY_NUMPY[str(dt)]
    except KeyError:
        raise OipError(f"numpy dtype {dt} has no Open Inference Protocol datatype", 500) from None


def dtype_of(datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise OipError(
            f"unsupported datatype {datatype!r}; supported: {', '.join(DATATYPES)}"
        ) from None


def tensor_metadata(name: str, dtype: str, shape: Sequence[int | str]) -> dict[str, Any]:
    """Metadata entry of a tensor as ``GET /v2/models/{name}`` lists it:
    variable dimensions are -1 (batch included, as Triton reports models
    with a max batch size)."""
    return {"name": name, "datatype": datatype_of(dtype),
            "shape": [d if isinstance(d, int) else -1 for d in shape]}


# -- BYTES --------------------------------------------------------------------------------
def serialize_bytes(arr: np.ndarray) -> bytes:
    """Binary form of a BYTES tensor: per element (row-major), a 4-byte
    little-endian length and the bytes (``str`` elements as UTF-8)."""
    parts = []
    for item in np.asarray(arr, dtype=object).reshape(-1):
        b = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(data: bytes | memoryview, count: int, name: str = "tensor") -> np.ndarray:
    """Inverse of :func:`serialize_bytes`; exactly ``count`` elements must
    fill ``data`` exactly."""
    view = memoryview(data)
    if count * 4 > len(view):
        # Every element carries a 4-byte length: refuse before allocating
        # an array the data could never fill.
        raise OipError(f"input {name!r}: {len(view)} bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise OipError(f"input {name!r}: BYTES data ends after {i} of {count} elements")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise OipError(f"input {name!r}: BYTES element {i} claims {n} bytes past the end of its data")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != len(view):
        raise OipError(f"input {name!r}: {len(view) - pos} bytes left over after {count} BYTES elements")
    return out


# -- requests -----------------------------------------------------------------------------
def _shape(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise OipError(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 0 for d in raw):
        raise OipError(f"input {name!r}: shape {raw} has a negative dimension")
    # numpy cannot describe an array whose non-zero dimensions multiply past
    # its index type, even an empty one; no real request comes near this.
    if math.prod(max(d, 1) for d in raw) > 2**40:
        raise OipError(f"input {name!r}: shape {raw} is too large")
    return tuple(raw)


def _json_data(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """Tensor from JSON ``data`` (flat or nested), type-checked element-wise
    by kind: JSON has no int8 or fp16, so a value must be of the datatype's
    kind (bool / integer / number / string) and fit its range."""
    count = math.prod(shape)
    if not isinstance(data, list):
        raise OipError(f"input {name!r}: 'data' must be a list")
    if datatype == "BYTES":
        flat = _flatten(name, data)
        if not all(isinstance(v, str) for v in flat):
            raise OipError(f"input {name!r}: BYTES data must be strings in JSON (use binary data for raw bytes)")
        if len(flat) != count:
            raise OipError(f"input {name!r}: {len(flat)} elements for shape {list(shape)} ({count} expected)")
        arr = np.empty(count, dtype=object)
        for i, v in enumerate(flat):
            arr[i] = v.encode("utf-8")
        return arr.reshape(shape)
    try:
        probe = np.asarray(data)
    except ValueError:
        raise OipError(f"input {name!r}: 'data' is a ragged nested list") from None
    if probe.size != count:
        raise OipError(f"input {name!r}: {probe.size} elements for shape {list(shape)} ({count} expected)")
    kind = probe.dtype.kind if probe.size else None
    dtype = DATATYPES[datatype]
    if kind is not None:
        if datatype == "BOOL":
            ok = kind == "b"
        elif dtype.kind in "iu":
            ok = kind in "iu"
        else:
            ok = kind in "iuf"
        if not ok:
            want = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}[dtype.kind]
            raise OipError(f"input {name!r}: datatype {datatype} takes {want} in JSON data")
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            if int(probe.min()) < info.min or int(probe.max()) > info.max:
                raise OipError(f"input {name!r}: values out of range for {datatype}")
    return np.asarray(probe, dtype=dtype).reshape(shape)


def _flatten(name: str, data: list) -> list:
    out: list = []
    stack = [iter(data)]
    depth = 1
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                depth += 1
                if depth > 32:
                    raise OipError(f"input {name!r}: 'data' is nested too deeply")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
            depth -= 1
    return out


def _binary_data(name: str, datatype: str, shape: tuple[int, ...], data: memoryview) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(data, count, name).reshape(shape)
    dtype = DATATYPES[datatype]
    want = count * dtype.itemsize
    if len(data) != want:
        raise OipError(
            f"input {name!r}: binary_data_size is {len(data)} bytes; shape {list(shape)} of {datatype} "
            f"needs {want}"
        )
    # Copy: the slice may be unaligned and the body buffer is not ours to keep.
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=True).reshape(shape)


def _no_shared_memory(what: str, params: Mapping[str, Any]) -> None:
    if any(k.startswith("shared_memory") for k in params):
        raise OipError(f"{what}: shared-memory tensors are not supported by this server")


def parse_infer_request(body: bytes, header_length: int | str | None = None) -> InferRequest:
    """Parse an ``/infer`` body: JSON, or a JSON header of ``header_length``
    bytes followed by binary tensor data.  Raises :class:`OipError` (400)."""
    view = memoryview(body)
    if header_length is not None:
        try:
            hlen = int(header_length)
        except (TypeError, ValueError):
            raise OipError(f"{HEADER_LENGTH} is not an integer") from None
        if not 0 <= hlen <= len(view):
            raise OipError(f"{HEADER_LENGTH} is {hlen}, but the body has {len(view)} bytes")
    else:
        hlen = len(view)
    try:
        req = json.loads(bytes(view[:hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        msg = getattr(exc, "msg", type(exc).__name__)
        raise OipError(f"request header is not valid JSON: {msg}") from None
    if not isinstance(req, dict):
        raise OipError("request must be a JSON object")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError("request needs a non-empty 'inputs' list")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise OipError("request 'parameters' must be an object")
    binary = view[hlen:]
    pos = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise OipError("each input needs a 'name'")
        name = raw["name"]
        if name in inputs:
            raise OipError(f"input {name!r} is given twice")
        datatype = raw.get("datatype")
        dtype_of(datatype)
        shape = _shape(name, raw.get("shape"))
        iparams = raw.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise OipError(f"input {name!r}: 'parameters' must be an object")
        _no_shared_memory(f"input {name!r}", iparams)
        if "binary_data_size" in iparams:
            size = iparams["binary_data_size"]
            if header_length is None:
                raise OipError(f"input {name!r} has binary data but the request has no {HEADER_LENGTH} header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise OipError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if pos + size > len(binary):
                raise OipError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - pos} bytes left)"
                )
            inputs[name] = _binary_data(name, datatype, shape, binary[pos : pos + size])
            pos += size
        elif "data" in raw:
            inputs[name] = _json_data(name, datatype, shape, raw["data"])
        else:
            raise OipError(f"input {name!r} has neither 'data' nor binary_data_size")
    if pos != len(binary):
        raise OipError(f"body has {len(binary) - pos} bytes of binary data that no input claims")
    outputs = None
    raw_outputs = req.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise OipError("'outputs' must be a list")
        outputs = []
        default = bool(params.get("binary_data_output", False))
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise OipError("each requested output needs a 'name'")
            oparams = raw.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise OipError(f"output {raw['name']!r}: 'parameters' must be an object")
            _no_shared_memory(f"output {raw['name']!r}", oparams)
            if oparams.get("classification"):
                raise OipError(f"output {raw['name']!r}: the classification extension is not supported")
            outputs.append(RequestedOutput(raw["name"], bool(oparams.get("binary_data", default))))
    rid = req.get("id")
    return InferRequest(
        inputs=inputs, outputs=outputs, binary_output=bool(params.get("binary_data_output", False)),
        id=rid if isinstance(rid, str) else None, parameters=params,
    )


def encode_infer_request(
    inputs: Mapping[str, np.ndarray], *, binary: bool = True, outputs: Sequence[RequestedOutput] | None = None,
    binary_output: bool | None = None, request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Body (and header length, ``None`` for plain JSON) of an ``/infer``
    request: the client side of :func:`parse_infer_request`, for tests and
    simple clients without tritonclient."""
    tensors, blobs = [], []
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        t: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype_of(arr.dtype)}
        if binary:
            blob = _to_binary(arr, t["datatype"])
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = _to_json_list(arr, t["datatype"])
        tensors.append(t)
    req: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        req["id"] = request_id
    if outputs is not None:
        req["outputs"] = [{"name": o.name, "parameters": {"binary_data": o.binary}} for o in outputs]
    if binary_output is not None:
        req["parameters"] = {"binary_data_output": binary_output}
    head = json.dumps(req, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


# -- signatures -----------------------------------------------------------------------------
def validate_inputs(
    inputs: Mapping[str, np.ndarray], specs: Iterable[TensorSpecLike], *, max_batch: int | None = None,
) -> dict[str, int]:
    """Check named tensors against a signature: every input present and no
    other, exact datatype, rank, fixed dimensions, and one size per named
    variable dimension (``batch``, ``sequence``).  Returns the variable
    dimensions' sizes.  A batch must have at least one row and, when
    ``max_batch`` is given, at most that many."""
    specs = list(specs)
    want = {s.name for s in specs}
    extra = sorted(set(inputs) - want)
    if extra:
        raise OipError(f"unexpected input {extra[0]!r}; the model takes {sorted(want)}")
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise OipError(f"input {missing[0]!r} is missing; the model takes {sorted(want)}")
    dims: dict[str, int] = {}
    where: dict[str, str] = {}
    for s in specs:
        arr = inputs[s.name]
        want_type, got_type = datatype_of(s.dtype), datatype_of(arr.dtype)
        if got_type != want_type:
            raise OipError(f"input {s.name!r}: datatype {got_type}, expected {want_type}")
        if arr.ndim == len(s.shape) and all(  # the common case, checked without building messages
                n == d if isinstance(d, int) else dims.setdefault(d, n) == n for d, n in zip(s.shape, arr.shape)):
            where.update((d, s.name) for d in s.shape if isinstance(d, str) and d not in where)
            continue
        expected = tensor_metadata(s.name, s.dtype, s.shape)
        if arr.ndim != len(s.shape):
            raise OipError(
                f"input {s.name!r}: shape {list(arr.shape)} has rank {arr.ndim}, expected shape "
                f"{expected['shape']} (rank {len(s.shape)})"
            )
        for axis, (d, n) in enumerate(zip(s.shape, arr.shape, strict=True)):
            if isinstance(d, int):
                if n != d:
                    raise OipError(
                        f"input {s.name!r}: shape {list(arr.shape)}, expected {expected['shape']} "
                        f"(dimension {axis} must be {d})"
                    )
            elif d in dims and dims[d] != n:
                raise OipError(
                    f"input {s.name!r}: dimension {axis} ({d}) is {n}, but input {where[d]!r} has {dims[d]}"
                )
            else:
                dims.setdefault(d, n)
                where.setdefault(d, s.name)
    batch = dims.get("batch")
    if batch is not None:
        if batch < 1:
            raise OipError("the batch dimension must be at least 1")
        if max_batch is not None and batch > max_batch:
            raise OipError(f"batch of {batch} rows exceeds this server's limit of {max_batch}", 413)
    return dims


# -- responses ------------------------------------------------------------------------------
def tensor_from_bytes(name: str, datatype: str, shape: Sequence[int], data: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw little-endian bytes (HTTP binary data, gRPC
    ``raw_input_contents``); checks the size against the shape."""
    dtype_of(datatype)
    return _binary_data(name, datatype, _shape(name, list(shape)), memoryview(data))


def tensor_to_bytes(arr: np.ndarray) -> tuple[str, bytes]:
    """(datatype, raw bytes) of a tensor, as HTTP binary data and gRPC
    ``raw_output_contents`` carry it."""
    datatype = datatype_of(arr.dtype)
    return datatype, _to_binary(arr, datatype)


def _to_binary(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=DATATYPES[datatype].newbyteorder("<")).tobytes()


def _to_json_list(arr: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        out = []
        for v in np.asarray(arr, dtype=object).reshape(-1):
            b = v if isinstance(v, (bytes, bytearray)) else str(v).encode("utf-8")
            try:
                out.append(bytes(b).decode("utf-8"))
            except UnicodeDecodeError:
                raise OipError("a BYTES output is not UTF-8; request it with binary_data", 400) from None
        return out
    return np.asarray(arr).reshape(-1).tolist()


def build_infer_response(
    model_name: str, model_version: str, outputs: Mapping[str, np.ndarray], *,
    requested: Sequence[RequestedOutput] | None = None, binary_output: bool = False,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Response body, and the JSON header's length when any output is binary
    (send it as ``Inference-Header-Content-Length``; ``None``: plain JSON).
    ``requested`` picks and orders outputs (all of ``outputs`` when
    ``None``, each binary iff ``binary_output``)."""
    if requested is None:
        requested = [RequestedOutput(n, binary_output) for n in outputs]
    tensors, blobs = [], []
    for r in requested:
        if r.name not in outputs:
            raise OipError(f"unknown output {r.name!r}; the model gives {sorted(outputs)}")
        arr = np.asarray(outputs[r.name])
        datatype = datatype_of(arr.dtype)
        t: dict[str, Any] = {"name": r.name, "datatype": datatype, "shape": list(arr.shape)}
        if r.binary:
            blob = _to_binary(arr, datatype)
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = _to_json_list(arr, datatype)
        tensors.append(t)
    resp: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": tensors}
    if request_id is not None:
        resp["id"] = request_id
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def parse_infer_response(body: bytes, header_length: int | str | None = None) -> dict[str, np.ndarray]:
    """Outputs of an ``/infer`` response by name (the client side of
    :func:`build_infer_response`)."""
    hlen = len(body) if header_length is None else int(header_length)
    resp = json.loads(body[:hlen])
    out: dict[str, np.ndarray] = {}
    pos = hlen
    for t in resp.get("outputs", []):
        datatype, shape = t["datatype"], tuple(t["shape"])
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = memoryview(body)[pos : pos + size]
            pos += size
            out[t["name"]] = _binary_data(t["name"], datatype, shape, chunk)
        else:
            out[t["name"]] = _json_data(t["name"], datatype, shape, t["data"])
    return out


def error_body(message: str) -> bytes:
    """The protocol's error body, which tritonclient turns into an
    ``InferenceServerException`` with this message."""
    return json.dumps({"error": message}).encode()


# -- the records ensemble (NAME_ensemble on Triton and on Serve) ----------------------------------------------
RECORD = "RECORD"
"""The ensemble's one input: a BYTES ``[batch, 1]`` tensor of raw record JSON."""
PREPROCESS_OUTPUTS = ("VALID", "ERROR", "ERROR_MESSAGE")
"""What the ensemble adds to the model's outputs for every row: accepted?,
reason code and message (empty when accepted)."""
TOKEN_OFFSETS = "TOKEN_OFFSETS"
"""``[batch, max_length, 2]`` character span of every token, for models with a token head."""
ENSEMBLE_SUFFIX = "_ensemble"
"""``NAME_ensemble`` takes raw records (Triton's ensemble, and its twin on Serve)."""

# -- generation (NAME_generate on Triton and on Serve): one contract for both servers --------------------------
GENERATE_SUFFIX = "_generate"
"""``NAME_generate`` takes raw records and streams tokens (a decoupled model:
many responses per request, over gRPC's ``ModelStreamInfer``)."""
MAX_NEW_TOKENS = "MAX_NEW_TOKENS"
"""Optional ``INT32 [1]`` input: the most new tokens per record (default: the head's answer length)."""
GENERATE_INPUTS: tuple[tuple[str, str, tuple[int, ...], bool], ...] = (
    (RECORD, "BYTES", (-1,), False),
    (MAX_NEW_TOKENS, "INT32", (1,), True),
)
"""(name, datatype, shape, optional) of ``NAME_generate``'s inputs."""
GENERATE_OUTPUTS: tuple[tuple[str, str], ...] = (
    ("INDEX", "INT32"), ("ID", "BYTES"), ("TEXT", "BYTES"), ("TOKEN_ID", "INT64"),
    ("FINISH_REASON", "BYTES"), ("ERROR_CODE", "BYTES"), ("ERROR_MESSAGE", "BYTES"),
)
"""Every streamed response carries one token event as ``[1]`` tensors:
the record's place in the request (``INDEX``), its id, the text delta, the
token id (-1 on a sequence's closing event or an error), the finish reason
(``stop`` / ``length``, empty until the sequence ends) and, for a rejected
record, its reason code and message."""


def token_event_tensors(event: Any) -> dict[str, np.ndarray]:
    """A :class:`pipeline.generate.TokenEvent` as ``NAME_generate``'s output
    tensors (one home for Triton's decoupled model and Serve's gRPC stream)."""
    err = event.error
    return {
        "INDEX": np.array([event.index], dtype=np.int32),
        "ID": np.array([event.id.encode()], dtype=object),
        "TEXT": np.array([event.text.encode()], dtype=object),
        "TOKEN_ID": np.array([-1 if event.token_id is None else event.token_id], dtype=np.int64),
        "FINISH_REASON": np.array([(event.finish_reason or "").encode()], dtype=object),
        "ERROR_CODE": np.array([(err.code if err else "").encode()], dtype=object),
        "ERROR_MESSAGE": np.array([(err.message if err else "").encode()], dtype=object),
    }


def token_event_fields(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse, for clients: one streamed response's tensors as a plain
    dict (``error`` is ``{"code", "message"}`` or None)."""

    def text(name: str) -> str:
        v = np.asarray(outputs[name]).reshape(-1)[0]
        return v.decode() if isinstance(v, bytes) else str(v)

    token = int(np.asarray(outputs["TOKEN_ID"]).reshape(-1)[0])
    code = text("ERROR_CODE")
    return {"index": int(np.asarray(outputs["INDEX"]).reshape(-1)[0]), "id": text("ID"), "text": text("TEXT"),
            "token_id": None if token < 0 else token, "finish_reason": text("FINISH_REASON") or None,
            "error": {"code": code, "message": text("ERROR_MESSAGE")} if code else None}



def ensemble_features(pre: Any, batch: Any, seq_len: int | None,
                      dims: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """The ensemble's per-row tensors for a decoded batch: the model's inputs
    with text padded to the model's full length ``seq_len`` (so every
    request has one shape and requests batch together), a rejected record as
    a zero row with an all-zero presence mask, plus ``VALID`` / ``ERROR`` /
    ``ERROR_MESSAGE`` and, with text, ``TOKEN_OFFSETS``.

    ``pre`` is the package's :class:`~pipeline.preprocess.Preprocessor` and
    ``batch`` a :class:`~pipeline.columnar.ColumnarBatch` (``Predictor.decode``);
    the padding is the batch's own rule (``fixed_length``).  ``dims``: per-row
    dims of each model input, when the caller knows them already."""
    from dataclasses import replace as _replace

    from pipeline.columnar import pad_to

    n = batch.size
    fixed = _replace(batch, fixed_length=seq_len) if seq_len is not None else batch
    feeds = pre.feeds(fixed) if len(batch) else {}
    ids_name = pre.input_name("text.input_ids") if pre.text is not None else None
    out: dict[str, np.ndarray] = {}
    for t in pre.inputs or []:
        row_dims = list(dims[t.name]) if dims is not None else [
            seq_len if d == "sequence" else int(d) for d in t.shape[1:]]
        fill = pre.text.pad_id if t.name == ids_name else 0
        arr = np.full((n, *row_dims), fill, dtype=np.dtype(t.dtype))
        if t.name in feeds:
            arr[batch.positions] = feeds[t.name]
        out[t.name] = arr
    valid, error, message = PREPROCESS_OUTPUTS
    out[valid] = np.zeros((n, 1), dtype=bool)
    out[valid][batch.positions] = True
    out[error] = np.full((n, 1), b"", dtype=object)
    out[message] = np.full((n, 1), b"", dtype=object)
    rej = batch.rejected
    for pos, code, msg in zip(rej.positions.tolist(), rej.codes, rej.messages, strict=True):
        out[error][pos, 0], out[message][pos, 0] = code.encode(), msg.encode()
    if seq_len is not None:
        offsets = np.zeros((n, seq_len, 2), dtype=np.int64)
        if len(batch) and batch.offsets is not None:
            offsets[batch.positions] = pad_to(batch.offsets, 1, seq_len, 0)[:, :seq_len]
        out[TOKEN_OFFSETS] = offsets
    return out


# -- model configuration (GET /v2/models/NAME/config, gRPC ModelConfig) ----------------------------------------
_CONFIG_TYPES = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
                 "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
                 "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
                 "BYTES": "TYPE_STRING"}


def model_config(name: str, platform: str, inputs: Iterable[TensorSpecLike], outputs: Iterable[TensorSpecLike],
                 *, max_batch_size: int, preferred: Sequence[int] = (), delay_us: int = 0) -> dict[str, Any]:
    """A model's configuration in Triton's JSON form (the ``ModelConfig``
    protobuf as JSON, what ``GET /v2/models/NAME/config`` answers): the
    batch axis is implied by ``max_batch_size``, variable dims are -1."""

    def tensor(t: TensorSpecLike) -> dict[str, Any]:
        dims = [d if isinstance(d, int) else -1 for d in t.shape[1:]]
        return {"name": t.name, "data_type": _CONFIG_TYPES[datatype_of(t.dtype)], "dims": dims}

    cfg: dict[str, Any] = {
        "name": name, "platform": platform, "backend": "", "max_batch_size": max_batch_size,
        "input": [tensor(t) for t in inputs], "output": [tensor(t) for t in outputs],
    }
    if preferred or delay_us:
        cfg["dynamic_batching"] = {"preferred_batch_size": list(preferred), "max_queue_delay_microseconds": delay_us}
    return cfg
