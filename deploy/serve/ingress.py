"""The server deployment: Open Inference Protocol (KServe v2) on HTTP and
gRPC, a friendly records API, health and metrics, answered by the replica
that holds the models (one hop: proxy -> this replica; see
``deploy/serve/README.md`` for why ingress and models live in one
deployment).

Routes (``NAME`` is a served model, ``WORKLOAD`` its workload):

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/NAME[/versions/V][/ready]
    GET  /v2/models/NAME[/versions/V]/config               Triton's JSON model configuration
    POST /v2/models/NAME[/versions/V]/infer            model tensors -> logits
    POST /v2/models/NAME_ensemble[/versions/V]/infer   RECORD bytes -> logits, VALID, ERROR
    POST /v1/WORKLOAD/predict                          records (JSON or multipart) -> Results
    POST /v1/WORKLOAD/generate                         records -> generated text (JSON, or SSE as tokens come)
    GET  /metrics                                      mmpipe_* of every replica (Prometheus)

gRPC: Triton's ``GRPCInferenceService`` (:mod:`deploy.serve.grpc_oip`), with
``ModelStreamInfer`` streaming ``NAME_generate``'s tokens (a decoupled model,
as Triton serves its twin).
Protocol errors, unknown routes included, answer ``{"error": "..."}`` as Triton does (tritonclient
raises them as ``InferenceServerException``); the friendly API answers
``{"error": {"code", "message"}}`` like a rejected record.  The body-size
limit is enforced from ``Content-Length`` and again while the body streams
in, so an oversize request is refused before it is held in memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import traceback
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from ray import serve
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deploy.serve import grpc_oip
from deploy.serve.config import SERVER, ModelRoute, UserConfig, request_limits
from deploy.serve.metrics_hub import Publisher, exposition, get_hub
from deploy.serve.model import Failure, ModelRuntime
from pipeline import __version__
from pipeline.config import GenerateConfig, Settings
from pipeline.errors import Reason
from pipeline.generate import GenerationError, Sampling, TokenEvent
from pipeline.log import log_event, setup_logging
from pipeline.metrics import get_metrics
from pipeline.oip import (
    ENSEMBLE_SUFFIX,
    GENERATE_SUFFIX,
    HEADER_LENGTH,
    OipError,
    build_infer_response,
    error_body,
    parse_infer_request,
)

logger = logging.getLogger(__name__)

_INFER_TYPES = {"", "application/json", "application/octet-stream", "application/x-www-form-urlencoded"}
"""Content types /infer takes.  Triton ignores Content-Type, and tritonclient
sends none; curl's ``-d`` default (form-urlencoded) is accepted for the same
reason.  Anything else (an image, a multipart upload) is a client mistake: 415."""
_MEDIA_FIELDS = ("image", "audio", "video")
_JSON_FIELDS = ("tabular", "metadata")
_OFFLOAD_BYTES = 256 * 1024
"""Bodies above this are parsed and encoded in a worker thread, not on the event loop."""

_NAME = r"(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = tuple(
    (method, re.compile(pattern), handler) for method, pattern, handler in (
        ("POST", rf"/v2/models/{_NAME}/infer", "infer"),  # the hot route first
        ("POST", r"/v1/(?P<workload>[^/]+)/predict", "predict"),
        ("POST", r"/v1/(?P<workload>[^/]+)/generate", "generate"),
        ("GET", r"/v2/health/live", "live"),
        ("GET", r"/v2/health/ready", "ready"),
        ("GET", r"/v2", "server_metadata"),
        ("GET", rf"/v2/models/{_NAME}", "model_metadata"),
        ("GET", rf"/v2/models/{_NAME}/config", "model_config"),
        ("GET", rf"/v2/models/{_NAME}/ready", "model_ready"),
        ("GET", r"/metrics", "metrics_endpoint"),
    ))
"""(method, path relative to the application's route prefix, ``Server``
method).  The server routes requests itself rather than through a web
framework's router: on the replica's one event loop every microsecond per
request is throughput, and this table is the whole of what routing needs."""


def route(method: str, path: str) -> tuple[str, dict[str, str | None]] | list[str]:
    """(handler, path parameters) of a request, or the methods the path
    takes when it takes others (405), or ``[]`` when no route has the path
    (404).  HEAD is answered as GET; one trailing slash is ignored."""
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    method = "GET" if method == "HEAD" else method
    allowed: list[str] = []
    for m, pattern, handler in ROUTES:
        match = pattern.fullmatch(path)
        if match is not None:
            if m == method:
                return handler, match.groupdict()
            allowed.append(m)
    return allowed


class HttpError(Exception):
    """A request-level failure; ``code`` is the friendly API's reason code."""

    def __init__(self, status: int, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def _oip_error(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json")


def _v1_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed
    ``limit``: from Content-Length before reading, else while streaming."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HttpError(400, "Content-Length is not an integer") from None
        if size > limit:
            raise HttpError(413, f"request body is {size} bytes; limit is {limit}", Reason.PAYLOAD_TOO_LARGE.value)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise HttpError(413, f"request body exceeds {limit} bytes", Reason.PAYLOAD_TOO_LARGE.value)
    return bytes(buf)


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo gzip/deflate request compression (tritonclient's
    ``request_compression_algorithm``), never inflating past ``limit``."""
    enc = (encoding or "identity").strip().lower()
    if enc == "identity":
        return body
    if enc not in ("gzip", "deflate"):
        raise HttpError(415, f"Content-Encoding {enc!r} is not supported (gzip, deflate)", "unsupported_media_type")
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise HttpError(400, f"request body is not valid {enc} data") from None
    if len(out) > limit or d.unconsumed_tail:
        raise HttpError(413, f"decompressed request body exceeds {limit} bytes", Reason.PAYLOAD_TOO_LARGE.value)
    return out


async def _offload(fn: Callable[..., Any], size: int, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args) if size > _OFFLOAD_BYTES else fn(*args)


def _json_records(body: bytes) -> tuple[list[Any], bool]:
    """(records, single?) of a JSON body: one record, or ``{"records": [...]}``."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HttpError(400, f"body is not valid JSON: {getattr(exc, 'msg', type(exc).__name__)}",
                        Reason.BAD_JSON.value) from None
    if isinstance(doc, dict) and "records" in doc:
        if set(doc) != {"records"} or not isinstance(doc["records"], list):
            raise HttpError(400, 'a batch is {"records": [record, ...]} and nothing else', Reason.BAD_RECORD.value)
        if not doc["records"]:
            raise HttpError(400, "no records given", Reason.BAD_RECORD.value)
        return doc["records"], False
    if isinstance(doc, dict):
        return [doc], True
    raise HttpError(400, f'body must be a record object or {{"records": [...]}}, got {type(doc).__name__}',
                    Reason.BAD_RECORD.value)


SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "do_sample": (bool,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float), "seed": (int,)}
"""Per-call decoding options (HTTP body fields, gRPC request parameters) and
the JSON types each takes; unset ones come from the settings' ``generate``."""
_GENERATE_FIELDS = frozenset({"records", "max_new_tokens", "stream", *SAMPLING_FIELDS})


def sampling_of(base: GenerateConfig, given: Mapping[str, Any]) -> Sampling:
    """The call's :class:`Sampling`: ``base`` (the settings' ``generate``)
    with the options the call names.  A wrong type is a 400 naming the
    option; a value out of range is refused by ``Sampling.check``."""
    for key, value in given.items():
        want = SAMPLING_FIELDS[key]
        if isinstance(value, bool) != (want == (bool,)) or not isinstance(value, want):
            kind = {(bool,): "true or false", (int,): "an integer"}.get(want, "a number")
            raise HttpError(400, f"{key!r} must be {kind}", Reason.BAD_RECORD.value)
    return dataclasses.replace(Sampling.from_config(base), **given)


@dataclasses.dataclass
class GenerateCall:
    """A parsed ``POST /v1/WORKLOAD/generate`` body."""

    records: list[Any]
    single: bool
    max_new_tokens: int | None
    stream: bool | None
    options: dict[str, Any]


def _generate_call(body: bytes) -> GenerateCall:
    """One record (its defaults for everything), or ``{"records": [...],
    "max_new_tokens", "stream", "do_sample", "temperature", "top_k",
    "top_p", "seed"}`` (all but ``records`` optional)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HttpError(400, f"body is not valid JSON: {getattr(exc, 'msg', type(exc).__name__)}",
                        Reason.BAD_JSON.value) from None
    if not isinstance(doc, dict):
        raise HttpError(400, f'body must be a record object or {{"records": [...], ...}}, got {type(doc).__name__}',
                        Reason.BAD_RECORD.value)
    if "records" not in doc:
        return GenerateCall([doc], True, None, None, {})
    unknown = sorted(set(doc) - _GENERATE_FIELDS)
    if unknown:
        raise HttpError(400, f"unknown field {unknown[0]!r}; a generate call takes {sorted(_GENERATE_FIELDS)}",
                        Reason.BAD_RECORD.value)
    records, new, stream = doc["records"], doc.get("max_new_tokens"), doc.get("stream")
    if not isinstance(records, list) or not records:
        raise HttpError(400, "'records' must be a non-empty list of records", Reason.BAD_RECORD.value)
    if new is not None and (isinstance(new, bool) or not isinstance(new, int)):
        raise HttpError(400, "'max_new_tokens' must be an integer", Reason.BAD_RECORD.value)
    if stream is not None and not isinstance(stream, bool):
        raise HttpError(400, "'stream' must be true or false", Reason.BAD_RECORD.value)
    options = {k: doc[k] for k in SAMPLING_FIELDS if doc.get(k) is not None}
    return GenerateCall(records, False, new, stream, options)


def _sse(events: AsyncIterator[TokenEvent], first: TokenEvent | None) -> AsyncIterator[bytes]:
    """Server-sent events: one ``data: <json>`` per token event
    (``TokenEvent.as_dict``), then ``data: [DONE]``; a failure after the
    stream began ends it with ``data: {"error": {...}}`` and no ``[DONE]``."""

    def frame(doc: Any) -> bytes:
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    async def gen() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield frame(first.as_dict())
            async for ev in events:
                yield frame(ev.as_dict())
        except Exception as exc:
            yield frame({"error": {"code": "internal", "message": _internal(exc)}})
            return
        yield b"data: [DONE]\n\n"

    return gen()


_SERVER_METADATA = {"name": "mmpipe", "version": __version__,
                    "extensions": ["binary_tensor_data", "model_configuration"]}


def _internal(exc: BaseException) -> str:
    """Log where an unexpected failure happened (never what: exception
    messages may quote request content) and the message to answer."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else None
    log_event(logger, logging.ERROR, "request_failed", exc_type=type(exc).__name__, where=where)
    return f"internal error ({type(exc).__name__})"


def _json_lines_body(lines: list[bytes], single: bool) -> bytes:
    """The /v1 answer from results already encoded once: one result, or ``{"results": [...]}``."""
    return lines[0] if single else b'{"results":[' + b",".join(lines) + b"]}"


def _replica_threads() -> int:
    """One intra-op thread per CPU this replica reserved: replicas sharing a
    node must not each spin up a thread per core."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus))


# Module-level helpers the class uses are defined above it: Serve pickles the
# decorated class by value at decoration time, with the globals that exist then.
# Replica count and autoscaling are left to the Serve config: set here, a
# config's `num_replicas` would be silently overridden by this autoscaling.
# Serve's per-request access log is off by default (a formatted, rotated file
# line per request is about 4% of the replica's interpreter time); a Serve
# config turns it back on with `logging_config: {enable_access_log: true}`.
@serve.deployment(
    name=SERVER,
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    user_config=UserConfig().model_dump(),
    health_check_period_s=10,
    logging_config={"enable_access_log": False},
)
class Server:
    """Every model of the application, answering HTTP and gRPC itself (see the module docstring)."""

    def __init__(self, routes: list[dict[str, Any]], settings: dict[str, Any]) -> None:
        cfg = Settings.model_validate(settings)
        setup_logging(cfg.log_level)
        self.routes = {r["name"]: ModelRoute.model_validate(r) for r in routes}
        self.by_workload = {r.workload: r.name for r in self.routes.values()}
        limits = request_limits(cfg)
        self.max_body = limits.max_request_bytes
        self.max_records = limits.max_batch_records
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = get_metrics(self.registry)
        threads = _replica_threads()
        self.models = {r.name: ModelRuntime(r.package, r.name, r.workload, cfg, self.metrics, threads)
                       for r in self.routes.values()}
        self.generate_cfg = cfg.generate
        self.user_config = UserConfig()
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.publisher = Publisher(self.registry, ctx.app_name, f"{ctx.deployment}#{ctx.replica_tag}")
        self.publisher.ensure_started()
        self._hub: Any = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (batching) to every model without a restart."""
        self.user_config = UserConfig.model_validate(user_config or {})
        for m in self.models.values():
            m.reconfigure(self.user_config)
        log_event(logger, logging.INFO, "batching_configured", max_batch_size=self.user_config.max_batch_size,
                  batch_wait_timeout_s=self.user_config.batch_wait_timeout_s)

    def check_health(self) -> None:
        """Serve's health check: the replica is alive even when a model failed
        to load (that model reports not ready and answers 503)."""

    # -- helpers --------------------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[ModelRuntime, str]:
        """(model, kind) of a served model name; ``NAME_ensemble`` takes
        records, ``NAME_generate`` generates (where the package has a head)."""
        if name in self.models:
            return self.models[name], "model"
        for suffix, kind in ((ENSEMBLE_SUFFIX, "ensemble"), (GENERATE_SUFFIX, "generate")):
            model = self.models.get(name[: -len(suffix)]) if name.endswith(suffix) else None
            if model is None:
                continue
            if kind == "generate" and model.ready and model.generator is None:
                raise HttpError(404, f"unknown model {name!r}: {model.no_head().message}", "unknown_model")
            return model, kind
        raise HttpError(404, f"unknown model {name!r}; served: {sorted(self.models)}", "unknown_model")

    def _checked(self, name: str, version: str | None) -> tuple[ModelRuntime, str]:
        model, kind = self._resolve(name)
        if version and model.ready and version != model.version:
            raise HttpError(404, f"model {name!r} has no version {version!r}; serving {model.version!r}",
                            "unknown_model")
        return model, kind

    def _not_ready(self) -> list[str]:
        return sorted(n for n, m in self.models.items() if not m.ready)

    async def _guard(self, fn: Callable[[], Awaitable[Response]], friendly: bool = False) -> Response:
        """Map failures to responses; internal errors are logged by type only."""
        try:
            return await fn()
        except (HttpError, OipError) as exc:
            code = exc.code if isinstance(exc, HttpError) else "bad_request"
            return _v1_error(exc.status, code, exc.message) if friendly else _oip_error(exc.status, exc.message)
        except Exception as exc:
            msg = _internal(exc)
            return _v1_error(500, "internal", msg) if friendly else _oip_error(500, msg)
        finally:
            self.publisher.mark()

    # -- health and metadata ------------------------------------------------------------------
    # -- HTTP ------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        """Every HTTP request: routed by :data:`ROUTES` to a handler taking
        the request and its path parameters.  Unknown routes and methods
        answer the protocol's ``{"error": ...}`` (tritonclient cannot read
        any other shape)."""
        scope = request.scope
        path, root = scope["path"], scope.get("root_path", "")
        found = route(request.method, path[len(root):] if root and path.startswith(root) else path)
        if isinstance(found, tuple):
            handler, params = found
            return await getattr(self, handler)(request, **params)
        if found:
            return Response(error_body(f"method not allowed: {request.method} {path}"), status_code=405,
                            media_type="application/json", headers={"Allow": ", ".join(sorted(set(found)))})
        return _oip_error(404, f"no such route: {request.method} {path}")

    # -- health and metadata ------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        down = self._not_ready()
        return _oip_error(503, f"models not ready: {down}") if down else Response(status_code=200)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(_SERVER_METADATA)

    async def model_metadata(self, request: Request, name: str, version: str | None) -> Response:
        return await self._guard(lambda: self._described(name, version, "metadata"))

    async def model_config(self, request: Request, name: str, version: str | None) -> Response:
        return await self._guard(lambda: self._described(name, version, "config"))

    def describe(self, name: str, version: str | None, what: str) -> dict[str, Any] | Failure:
        """Metadata or configuration of a model (HTTP and gRPC alike)."""
        model, kind = self._checked(name, version)
        return model.metadata(kind) if what == "metadata" else model.config(kind, self.user_config)

    async def _described(self, name: str, version: str | None, what: str) -> Response:
        got = self.describe(name, version, what)
        if isinstance(got, Failure):
            return _oip_error(got.status, got.message)
        return JSONResponse(got)

    async def model_ready(self, request: Request, name: str, version: str | None) -> Response:
        return await self._guard(lambda: self._model_ready(name, version))

    async def _model_ready(self, name: str, version: str | None) -> Response:
        model, _ = self._checked(name, version)
        return Response(status_code=200) if model.ready else _oip_error(503, f"model {name!r} is not ready")

    # -- inference --------------------------------------------------------------------------------
    async def infer(self, request: Request, name: str, version: str | None) -> Response:
        return await self._guard(lambda: self._infer(name, version, request))

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        model, kind = self._resolve(name)
        with model.arrival(kind) as arrival:  # a batch forming now waits for this call
            ctype = _content_type(request)
            if ctype not in _INFER_TYPES:
                raise HttpError(415, f"Content-Type {ctype!r} is not accepted here; send JSON, or JSON followed by "
                                f"binary tensor data with {HEADER_LENGTH}", "unsupported_media_type")
            body = await read_body(request, self.max_body)
            body = decode_content(body, request.headers.get("content-encoding"), self.max_body)
            req = await _offload(parse_infer_request, len(body), body, request.headers.get(HEADER_LENGTH))
            if version:
                self._checked(name, version)
            requested = [o.name for o in req.outputs] if req.outputs is not None else None
            reply = await model.infer(kind, req.inputs, requested, arrival)
        if isinstance(reply, Failure):
            return _oip_error(reply.status, reply.message)
        out, hlen = await _offload(
            lambda: build_infer_response(name, reply.model_version, reply.outputs, requested=req.outputs,
                                         binary_output=req.binary_output, request_id=req.id),
            sum(a.nbytes for a in reply.outputs.values()),
        )
        if hlen is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(hlen)})

    # -- the friendly API ---------------------------------------------------------------------------
    async def predict(self, request: Request, workload: str) -> Response:
        return await self._guard(lambda: self._predict(workload, request), friendly=True)

    async def _predict(self, workload: str, request: Request) -> Response:
        model = self._workload_model(workload)
        with model.arrival("records") as arrival:  # a batch forming now waits for this call
            ctype = _content_type(request)
            if ctype not in ("application/json", "multipart/form-data"):
                raise HttpError(415, f"Content-Type {ctype or 'none'!r} is not accepted; send application/json "
                                "(one record or {\"records\": [...]}) or multipart/form-data", "unsupported_media_type")
            body = await read_body(request, self.max_body)
            body = decode_content(body, request.headers.get("content-encoding"), self.max_body)
            if ctype == "multipart/form-data":
                records, single = [await self._form_record(request, body)], True
            else:
                records, single = await _offload(_json_records, len(body), body)
            if len(records) > self.max_records:
                raise HttpError(413, f"{len(records)} records in one request; limit is {self.max_records}",
                                Reason.PAYLOAD_TOO_LARGE.value)
            for rec in records:
                if isinstance(rec, dict):
                    rec.setdefault("workload", workload)
            lines = await model.predict(records, arrival)
        if isinstance(lines, Failure):
            return _v1_error(lines.status, "model_not_ready" if lines.status == 503 else "error", lines.message)
        return Response(_json_lines_body(lines, single), media_type="application/json")

    async def generate(self, request: Request, workload: str) -> Response:
        return await self._guard(lambda: self._generate(workload, request), friendly=True)

    def _workload_model(self, workload: str) -> ModelRuntime:
        name = self.by_workload.get(workload)
        if name is None:
            raise HttpError(404, f"no model serves workload {workload!r}; served: {sorted(self.by_workload)}",
                            Reason.UNKNOWN_WORKLOAD.value)
        return self.models[name]

    async def _generate(self, workload: str, request: Request) -> Response:
        """Records to generated text: one JSON answer when every record is
        done, or server-sent events as the tokens are chosen (``"stream":
        true`` or ``Accept: text/event-stream``).  A call its limits refuse
        is a 400 before any model work; a rejected record gets its error."""
        model = self._workload_model(workload)
        if model.ready and model.generator is None:
            raise HttpError(404, f"workload {workload!r}: {model.no_head().message}", "no_generative_head")
        ctype = _content_type(request)
        if ctype != "application/json":
            raise HttpError(415, f"Content-Type {ctype or 'none'!r} is not accepted; send application/json "
                            "(one record, or {\"records\": [...], ...})", "unsupported_media_type")
        body = await read_body(request, self.max_body)
        body = decode_content(body, request.headers.get("content-encoding"), self.max_body)
        call = await _offload(_generate_call, len(body), body)
        if len(call.records) > self.max_records:
            raise HttpError(413, f"{len(call.records)} records in one request; limit is {self.max_records}",
                            Reason.PAYLOAD_TOO_LARGE.value)
        for rec in call.records:
            if isinstance(rec, dict):
                rec.setdefault("workload", workload)
        sampling = sampling_of(self.generate_cfg, call.options)
        stream = call.stream if call.stream is not None else "text/event-stream" in request.headers.get("accept", "")
        try:
            if stream:
                return await self._generate_sse(model, call, sampling)
            results = await model.generate(call.records, call.max_new_tokens, sampling)
        except GenerationError as exc:
            raise HttpError(400, str(exc), "bad_request") from None
        if isinstance(results, Failure):
            raise HttpError(results.status, results.message, "model_not_ready" if results.status == 503 else "error")
        lines = [r.model_dump_json().encode() for r in results]
        return Response(_json_lines_body(lines, call.single), media_type="application/json")

    async def _generate_sse(self, model: ModelRuntime, call: GenerateCall, sampling: Sampling) -> Response:
        """The event stream, begun only once the first event exists: a call
        the limits refuse is still a plain 400."""
        events = model.generate_stream(call.records, call.max_new_tokens, sampling)
        if isinstance(events, Failure):
            raise HttpError(events.status, events.message, "model_not_ready" if events.status == 503 else "error")
        first = await anext(events, None)
        return StreamingResponse(_sse(events, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _form_record(self, request: Request, body: bytes) -> dict[str, Any]:
        """One record from a multipart upload: fields ``id``, ``text``,
        ``tabular``/``metadata`` (JSON text), files ``image``/``audio``/``video``."""
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=8, max_fields=32, max_part_size=self.max_body)
        except Exception:
            raise HttpError(400, "malformed multipart/form-data body", Reason.BAD_RECORD.value) from None
        record: dict[str, Any] = {}
        try:
            for key in form:
                values = form.getlist(key)
                if len(values) != 1:
                    raise HttpError(400, f"form field {key!r} is given {len(values)} times", Reason.BAD_RECORD.value)
                value = values[0]
                if isinstance(value, UploadFile):
                    record[key] = await value.read()
                elif key in _JSON_FIELDS:
                    try:
                        record[key] = json.loads(value)
                    except ValueError:
                        record[key] = value  # the Predictor rejects it as a bad record, with the others answered
                else:
                    record[key] = value
        finally:
            await form.close()
        return record

    # -- metrics --------------------------------------------------------------------------------------
    async def metrics_endpoint(self, request: Request) -> Response:
        async def run() -> Response:
            if self._hub is None:
                self._hub = await asyncio.to_thread(get_hub, self.app_name)
            try:
                snapshots = await self._hub.snapshot.remote()
            except Exception:
                self._hub = None
                raise
            return Response(exposition(snapshots), media_type=CONTENT_TYPE_LATEST)

        return await self._guard(run)

    # -- gRPC: Triton's GRPCInferenceService ------------------------------------------------------------
    async def ServerLive(self, request: Any) -> Any:
        return grpc_oip.service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any) -> Any:
        return grpc_oip.service_pb2.ServerReadyResponse(ready=not self._not_ready())

    async def ServerMetadata(self, request: Any) -> Any:
        return grpc_oip.service_pb2.ServerMetadataResponse(**_SERVER_METADATA)

    async def ModelReady(self, request: Any, grpc_context: Any) -> Any:
        try:
            model, _ = self._checked(request.name, request.version or None)
        except HttpError as exc:
            grpc_oip.abort(grpc_context, exc.status, exc.message)
            return grpc_oip.service_pb2.ModelReadyResponse()
        return grpc_oip.service_pb2.ModelReadyResponse(ready=model.ready)

    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
        return self._grpc_describe(request, grpc_context, "metadata")

    async def ModelConfig(self, request: Any, grpc_context: Any) -> Any:
        return self._grpc_describe(request, grpc_context, "config")

    def _grpc_describe(self, request: Any, grpc_context: Any, what: str) -> Any:
        empty = (grpc_oip.service_pb2.ModelMetadataResponse() if what == "metadata"
                 else grpc_oip.service_pb2.ModelConfigResponse())
        try:
            got = self.describe(request.name, request.version or None, what)
        except HttpError as exc:
            grpc_oip.abort(grpc_context, exc.status, exc.message)
            return empty
        if isinstance(got, Failure):
            grpc_oip.abort(grpc_context, got.status, got.message)
            return empty
        return grpc_oip.metadata_response(got) if what == "metadata" else grpc_oip.config_response(got)

    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:
        """The gRPC twin of ``POST /v2/models/NAME/infer``: same checks, same messages."""
        try:
            model, kind = self._checked(request.model_name, request.model_version or None)
            with model.arrival(kind) as arrival:
                inputs, requested = grpc_oip.parse_request(request)
                reply = await model.infer(kind, inputs, requested, arrival)
        except (HttpError, OipError) as exc:
            reply = Failure(exc.status, exc.message)
        except Exception as exc:
            reply = Failure(500, _internal(exc))
        finally:
            self.publisher.mark()
        if isinstance(reply, Failure):
            grpc_oip.abort(grpc_context, reply.status, reply.message)
            return grpc_oip.service_pb2.ModelInferResponse()
        return grpc_oip.infer_response(request.model_name, reply.model_version, reply.outputs, request.id)

    async def ModelStreamInfer(self, request_stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Triton's bidirectional stream: each request of the stream is
        answered in turn.  ``NAME_generate`` answers one response per token
        event, the last flagged ``triton_final_response`` (or an empty final
        response when the request sets ``triton_enable_empty_final_response``),
        as Triton's decoupled models do; other models answer one response.
        A request that fails gets an error response with the HTTP route's
        message and the stream goes on, as on Triton."""
        async for request in request_stream:
            async for response in self._stream_one(request):
                yield response

    async def _stream_one(self, request: Any) -> AsyncIterator[Any]:
        try:
            model, kind = self._checked(request.model_name, request.model_version or None)
            inputs, requested = grpc_oip.parse_request(request)
            if kind != "generate":
                reply = await model.infer(kind, inputs, requested)
                if isinstance(reply, Failure):
                    raise HttpError(reply.status, reply.message)
                yield grpc_oip.stream_response(grpc_oip.infer_response(
                    request.model_name, reply.model_version, reply.outputs, request.id))
                return
            async for response in self._stream_tokens(model, request, inputs, requested):
                yield response
        except (HttpError, OipError) as exc:
            yield grpc_oip.stream_error(exc.message)
        except GenerationError as exc:
            yield grpc_oip.stream_error(str(exc))
        except Exception as exc:
            yield grpc_oip.stream_error(_internal(exc))
        finally:
            self.publisher.mark()

    async def _stream_tokens(self, model: ModelRuntime, request: Any, inputs: dict[str, Any],
                             requested: list[str] | None) -> AsyncIterator[Any]:
        records, new = model.generate_inputs(inputs)
        params = grpc_oip.request_parameters(request)
        empty_final = bool(params.pop(grpc_oip.EMPTY_FINAL, False))
        sampling = sampling_of(self.generate_cfg, {k: v for k, v in params.items() if k in SAMPLING_FIELDS})
        pick = grpc_oip.token_outputs(requested)
        events = model.generate_stream(records, new, sampling)
        if isinstance(events, Failure):
            raise HttpError(events.status, events.message)
        name, version, ended = request.model_name, model.version, 0
        async for ev in events:
            ended += ev.finish_reason is not None or ev.error is not None
            final = ended == len(records) and not empty_final
            yield grpc_oip.token_response(name, version, request.id, pick(ev), final=final)
            if final:
                return
        yield grpc_oip.final_response(name, version, request.id)

    def __del__(self) -> None:
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.close()
        for m in getattr(self, "models", {}).values():
            m.close()
