"""The HTTP ingress: Open Inference Protocol (KServe v2), a friendly records
API, health and metrics.  It routes by model name to the model deployments
and holds no model itself, so it stays small and scales on request count.

Routes (``NAME`` is a served model, ``WORKLOAD`` its workload):

    GET  /v2/health/live | /v2/health/ready | /v2
    GET  /v2/models/NAME[/versions/V][/ready]
    POST /v2/models/NAME[/versions/V]/infer            model tensors -> logits
    POST /v2/models/NAME_ensemble[/versions/V]/infer   RECORD bytes -> logits, VALID, ERROR
    POST /v1/WORKLOAD/predict                          records (JSON or multipart) -> Results
    GET  /metrics                                      mmpipe_* of every replica (Prometheus)

Protocol errors answer ``{"error": "..."}`` as Triton does (tritonclient
raises them as ``InferenceServerException``); the friendly API answers
``{"error": {"code", "message"}}`` like a rejected record.  The body-size
limit is enforced from ``Content-Length`` and again while the body streams
in, so an oversize request is refused before it is held in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from starlette.datastructures import UploadFile

from deploy.serve.config import ENSEMBLE_SUFFIX, INGRESS, ModelRoute, request_limits
from deploy.serve.metrics_hub import exposition, get_hub
from deploy.serve.model import Failure, TensorReply
from pipeline import __version__
from pipeline.config import Settings
from pipeline.errors import Reason
from pipeline.log import log_event, setup_logging
from pipeline.oip import HEADER_LENGTH, OipError, build_infer_response, error_body, parse_infer_request

logger = logging.getLogger(__name__)

_INFER_TYPES = {"", "application/json", "application/octet-stream", "application/x-www-form-urlencoded"}
"""Content types /infer takes.  Triton ignores Content-Type, and tritonclient
sends none; curl's ``-d`` default (form-urlencoded) is accepted for the same
reason.  Anything else (an image, a multipart upload) is a client mistake: 415."""
_MEDIA_FIELDS = ("image", "audio", "video")
_JSON_FIELDS = ("tabular", "metadata")
STATUS_TIMEOUT_S = 5.0
"""How long readiness waits for a model replica to answer before calling it not ready."""
_OFFLOAD_BYTES = 256 * 1024
"""Bodies above this are parsed and encoded in a worker thread, not on the event loop."""

app = FastAPI(title="mmpipe", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)


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


# Module-level helpers the class uses are defined above it: Serve pickles the
# decorated class by value at decoration time, with the globals that exist then.
@serve.deployment(
    name=INGRESS,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0.5},
)
@serve.ingress(app)
class Ingress:
    """Routes requests to the model deployments (see the module docstring)."""

    def __init__(self, models: dict[str, Any], routes: list[dict[str, Any]], settings: dict[str, Any]) -> None:
        cfg = Settings.model_validate(settings)
        setup_logging(cfg.log_level)
        self.handles = models
        self.routes = {r["name"]: ModelRoute.model_validate(r) for r in routes}
        self.by_workload = {r.workload: r.name for r in self.routes.values()}
        limits = request_limits(cfg)
        self.max_body = limits.max_request_bytes
        self.max_records = limits.max_batch_records
        self.app_name = serve.get_replica_context().app_name
        self._hub: Any = None

    # -- helpers --------------------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[Any, str]:
        """(handle, kind) of a served model name; ``NAME_ensemble`` takes records."""
        if name in self.handles:
            return self.handles[name], "model"
        if name.endswith(ENSEMBLE_SUFFIX) and name[: -len(ENSEMBLE_SUFFIX)] in self.handles:
            return self.handles[name[: -len(ENSEMBLE_SUFFIX)]], "ensemble"
        raise HttpError(404, f"unknown model {name!r}; served: {sorted(self.handles)}", "unknown_model")

    async def _status(self, name: str) -> dict[str, Any]:
        try:
            # Bounded: with no replica up, a call would wait for one to start.
            return await asyncio.wait_for(self.handles[name].status.remote(), STATUS_TIMEOUT_S)
        except Exception as exc:  # an unreachable or silent replica is simply not ready
            log_event(logger, logging.WARNING, "status_failed", model=name, exc_type=type(exc).__name__)
            return {"name": name, "ready": False, "version": ""}

    async def _checked(self, name: str, version: str | None) -> tuple[Any, str, dict[str, Any]]:
        handle, kind = self._resolve(name)
        status = await self._status(self._base(name, kind))
        if version and status.get("ready") and version != status.get("version"):
            raise HttpError(404, f"model {name!r} has no version {version!r}; serving {status.get('version')!r}",
                            "unknown_model")
        return handle, kind, status

    @staticmethod
    def _base(name: str, kind: str) -> str:
        return name[: -len(ENSEMBLE_SUFFIX)] if kind == "ensemble" else name

    async def _guard(self, fn: Callable[[], Awaitable[Response]], friendly: bool = False) -> Response:
        """Map failures to responses; internal errors are logged by type only."""
        try:
            return await fn()
        except HttpError as exc:
            return _v1_error(exc.status, exc.code, exc.message) if friendly else _oip_error(exc.status, exc.message)
        except OipError as exc:
            return _v1_error(exc.status, "bad_request", exc.message) if friendly else _oip_error(exc.status,
                                                                                                 exc.message)
        except Exception as exc:
            # Where, not what: exception messages may quote request content.
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else None
            log_event(logger, logging.ERROR, "request_failed", exc_type=type(exc).__name__, where=where)
            msg = f"internal error ({type(exc).__name__})"
            return _v1_error(500, "internal", msg) if friendly else _oip_error(500, msg)

    # -- health and metadata ------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live(self) -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready(self) -> Response:
        statuses = await asyncio.gather(*(self._status(n) for n in self.handles))
        down = sorted(s["name"] for s in statuses if not s.get("ready"))
        if down:
            return _oip_error(503, f"models not ready: {down}")
        return Response(status_code=200)

    @app.get("/v2")
    async def server_metadata(self) -> Response:
        return JSONResponse({"name": "mmpipe", "version": __version__, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/models/{name}")
    async def model_metadata(self, name: str) -> Response:
        return await self._metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}")
    async def model_version_metadata(self, name: str, version: str) -> Response:
        return await self._metadata(name, version)

    async def _metadata(self, name: str, version: str | None) -> Response:
        async def run() -> Response:
            handle, kind, _ = await self._checked(name, version)
            meta = await handle.metadata.remote(kind)
            if isinstance(meta, Failure):
                return _oip_error(meta.status, meta.message)
            return JSONResponse(meta)

        return await self._guard(run)

    @app.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> Response:
        return await self._model_ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_version_ready(self, name: str, version: str) -> Response:
        return await self._model_ready(name, version)

    async def _model_ready(self, name: str, version: str | None) -> Response:
        async def run() -> Response:
            _, _, status = await self._checked(name, version)
            if not status.get("ready"):
                return _oip_error(503, f"model {name!r} is not ready")
            return Response(status_code=200)

        return await self._guard(run)

    # -- inference --------------------------------------------------------------------------------
    @app.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        return await self._guard(lambda: self._infer(name, None, request))

    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer_version(self, name: str, version: str, request: Request) -> Response:
        return await self._guard(lambda: self._infer(name, version, request))

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        handle, kind = self._resolve(name)
        ctype = _content_type(request)
        if ctype not in _INFER_TYPES:
            raise HttpError(415, f"Content-Type {ctype!r} is not accepted here; send JSON, or JSON followed by "
                            f"binary tensor data with {HEADER_LENGTH}", "unsupported_media_type")
        body = await read_body(request, self.max_body)
        body = decode_content(body, request.headers.get("content-encoding"), self.max_body)
        req = await _offload(parse_infer_request, len(body), body, request.headers.get(HEADER_LENGTH))
        if version:
            await self._checked(name, version)
        requested = [o.name for o in req.outputs] if req.outputs is not None else None
        reply = await handle.infer.remote(kind, req.inputs, requested)
        if isinstance(reply, Failure):
            return _oip_error(reply.status, reply.message)
        assert isinstance(reply, TensorReply)
        out, hlen = await _offload(
            lambda: build_infer_response(name, reply.model_version, reply.outputs, requested=req.outputs,
                                         binary_output=req.binary_output, request_id=req.id),
            sum(a.nbytes for a in reply.outputs.values()),
        )
        if hlen is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(hlen)})

    # -- the friendly API ---------------------------------------------------------------------------
    @app.post("/v1/{workload}/predict")
    async def predict(self, workload: str, request: Request) -> Response:
        return await self._guard(lambda: self._predict(workload, request), friendly=True)

    async def _predict(self, workload: str, request: Request) -> Response:
        name = self.by_workload.get(workload)
        if name is None:
            raise HttpError(404, f"no model serves workload {workload!r}; served: {sorted(self.by_workload)}",
                            Reason.UNKNOWN_WORKLOAD.value)
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
        results = await self.handles[name].predict.remote(records)
        if isinstance(results, Failure):
            return _v1_error(results.status, "model_not_ready" if results.status == 503 else "error", results.message)
        return JSONResponse(results[0] if single else {"results": results})

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
    @app.get("/metrics")
    async def metrics(self) -> Response:
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

