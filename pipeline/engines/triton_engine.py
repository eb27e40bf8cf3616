"""Triton engine: the model runs on a Triton server, the Predictor stays here.

Batch workers and stream consumers keep decoding, batching and
postprocessing (so results, error codes and metrics are the same as on every
other path) and send the padded batch to a Triton fleet over the Open
Inference Protocol with ``tritonclient``, gRPC or HTTP (binary tensors).

Failures are split in two.  *Transient* ones (connection refused or reset,
``UNAVAILABLE``, HTTP 502/503/504) are retried with exponential backoff: a
server restarting or a pod being rescheduled should not fail a batch.
Everything else (invalid argument, unknown model, wrong shape: the request
itself is wrong) fails at once, since retrying cannot help.  Timeouts are not
retried either: the server may still be working on the request, and
resending it would only add load to an overloaded server.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pipeline.engines.base import EngineUnavailable
from pipeline.log import log_event

logger = logging.getLogger(__name__)

Protocol = Literal["grpc", "http"]

_TRANSIENT_GRPC = {"StatusCode.UNAVAILABLE"}
_TRANSIENT_HTTP = {"502", "503", "504"}
_TIMEOUT_STATUS = {"StatusCode.DEADLINE_EXCEEDED", "408"}
_NP_TO_TRITON = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                 "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


class TritonEngineError(RuntimeError):
    """A request to Triton failed.  ``retriable`` says whether it was a
    transient failure (after the retries ran out) or the request was wrong."""

    def __init__(self, message: str, *, retriable: bool, status: str | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.status = status


class TritonUnavailable(TritonEngineError, EngineUnavailable):
    """The server could not be reached after all retries."""


def classify(exc: BaseException) -> tuple[bool, str]:
    """(transient?, status) of an exception raised by tritonclient."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if status in _TRANSIENT_GRPC or status in _TRANSIENT_HTTP:
            return True, status
        # The HTTP client reports a dropped connection without a status.
        if not status and "connect" in str(exc.message()).lower():
            return True, "connection"
        return False, status or "error"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        # ConnectionRefused/Reset/Aborted: inference has no side effects, so resending is safe.
        # TimeoutError here is the HTTP client's connect/read timeout.
        return isinstance(exc, ConnectionError), type(exc).__name__
    if isinstance(exc, OSError):  # socket errors from geventhttpclient (EHOSTUNREACH, ...)
        return True, type(exc).__name__
    return False, type(exc).__name__


class TritonEngine:
    """Runs batches on a model served by Triton (see module docstring).

    One engine per thread with ``http`` (tritonclient's HTTP client is
    gevent-based and not thread-safe); the ``grpc`` client may be shared."""

    name = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        *,
        protocol: Protocol = "grpc",
        model_version: str = "",
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        output_names: Sequence[str] | None = None,
        input_specs: Sequence[dict[str, Any]] | None = None,
        check_model: bool = True,
    ) -> None:
        """``url`` is ``host:port`` (no scheme).  ``input_specs`` (``name`` and
        ``dtype`` of each input, e.g. the package signature's inputs) and
        ``output_names`` default to what the server's model metadata says.
        ``check_model`` asks the server up front whether the model is ready
        and has those inputs and outputs, so a misconfiguration fails at
        startup with a clear message rather than on the first batch."""
        if protocol not in ("grpc", "http"):
            raise ValueError(f"triton protocol {protocol!r}: use 'grpc' or 'http'")
        if "://" in url:
            url = url.split("://", 1)[1]
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.model_version = model_version
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.retries = max(0, int(retries))
        self.backoff_s = float(backoff_s)
        self.provider = f"triton:{protocol}://{self.url}/{model_name}"
        self.attempts = 0
        """attempts made by the last call (1 = no retry), for tests and logs"""
        if protocol == "grpc":
            import tritonclient.grpc as client_mod
        else:
            import tritonclient.http as client_mod
        self._mod = client_mod
        self._client = self._new_client()
        self.input_specs = [{"name": s["name"], "dtype": str(s["dtype"])} for s in input_specs or []]
        self.output_names = list(output_names or [])
        if check_model or not self.input_specs or not self.output_names:
            try:
                self._check_model()
            except BaseException:
                self.close()
                raise
        log_event(logger, logging.INFO, "triton_engine_ready", provider=self.provider,
                  inputs=",".join(s["name"] for s in self.input_specs), outputs=",".join(self.output_names))

    # -- plumbing -----------------------------------------------------------------------
    def _new_client(self) -> Any:
        if self.protocol == "grpc":
            return self._mod.InferenceServerClient(url=self.url)
        return self._mod.InferenceServerClient(
            url=self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )

    def _call(self, what: str, fn: Any) -> Any:
        """Run ``fn`` with retries on transient failures only."""
        delay = self.backoff_s
        for attempt in range(1, self.retries + 2):
            self.attempts = attempt
            try:
                return fn()
            except Exception as exc:
                transient, status = classify(exc)
                if status in _TIMEOUT_STATUS or isinstance(exc, TimeoutError):
                    raise TritonEngineError(
                        f"triton {what} on {self.provider} timed out after {self.timeout_s}s ({status}); "
                        "not retried (the server may still be running it)", retriable=False, status=status,
                    ) from exc
                if not transient:
                    raise TritonEngineError(
                        f"triton {what} on {self.provider} failed ({status}): {_message(exc)}",
                        retriable=False, status=status,
                    ) from exc
                if attempt > self.retries:
                    raise TritonUnavailable(
                        f"triton server {self.url} unavailable for {what} after {attempt} attempts "
                        f"({status}): {_message(exc)}", retriable=True, status=status,
                    ) from exc
                log_event(logger, logging.WARNING, "triton_retry", provider=self.provider, what=what,
                          status=status, attempt=attempt, sleep_s=round(delay, 3))
                time.sleep(delay)
                delay *= 2
                if self.protocol == "http":  # a dropped keep-alive connection is not reused
                    self._reset_client()
        raise AssertionError("unreachable")  # pragma: no cover

    def _reset_client(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail; a new client follows
            self._client.close()
        self._client = self._new_client()

    def _check_model(self) -> None:
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

        def ready() -> bool:
            return bool(self._client.is_model_ready(self.model_name, self.model_version, **kw))

        if not self._call("readiness check", ready):
            raise TritonEngineError(
                f"model {self.model_name!r} is not ready on triton server {self.url} (not loaded? "
                "load it, or point engine.triton_model at a loaded model)", retriable=False,
            )
        meta = self._call("metadata", lambda: self._client.get_model_metadata(self.model_name, self.model_version,
                                                                             **kw))
        if not isinstance(meta, dict):  # gRPC returns a protobuf message
            from google.protobuf.json_format import MessageToDict

            meta = MessageToDict(meta, preserving_proto_field_name=True)
        server_in = {t["name"]: t["datatype"] for t in meta.get("inputs", [])}
        server_out = [t["name"] for t in meta.get("outputs", [])]
        if not self.input_specs:
            inv = {v: k for k, v in _NP_TO_TRITON.items()}
            self.input_specs = [{"name": n, "dtype": inv.get(d, "float32")} for n, d in server_in.items()]
        if not self.output_names:
            self.output_names = server_out
        problems = []
        for s in self.input_specs:
            want = _NP_TO_TRITON.get(s["dtype"], s["dtype"])
            if s["name"] not in server_in:
                problems.append(f"input {s['name']!r} missing on the server")
            elif server_in[s["name"]] != want:
                problems.append(f"input {s['name']!r} is {server_in[s['name']]} on the server, expected {want}")
        problems += [f"output {n!r} missing on the server" for n in self.output_names if n not in server_out]
        if problems:
            raise TritonEngineError(
                f"model {self.model_name!r} on {self.url} does not match the package signature: "
                + "; ".join(problems), retriable=False,
            )

    # -- Engine protocol ------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send one batch; returns one float array per output."""
        mod, binary = self._mod, self.protocol == "http"
        inputs = []
        for spec in self.input_specs:
            arr = np.ascontiguousarray(feeds[spec["name"]], dtype=np.dtype(spec["dtype"]))
            inp = mod.InferInput(spec["name"], list(arr.shape), _NP_TO_TRITON[spec["dtype"]])
            if binary:
                inp.set_data_from_numpy(arr, binary_data=True)
            else:
                inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [mod.InferRequestedOutput(n, binary_data=True) if binary else mod.InferRequestedOutput(n)
                   for n in self.output_names]

        def infer() -> Any:
            if self.protocol == "grpc":
                return self._client.infer(self.model_name, inputs, model_version=self.model_version,
                                          outputs=outputs, client_timeout=self.timeout_s)
            return self._client.infer(self.model_name, inputs, model_version=self.model_version, outputs=outputs)

        result = self._call("inference", infer)
        out = {}
        for n in self.output_names:
            arr = result.as_numpy(n)
            if arr is None:
                raise TritonEngineError(f"triton response from {self.provider} has no output {n!r}", retriable=False)
            out[n] = arr.astype(np.float32, copy=False)
        return out

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                client.close()


def _message(exc: BaseException) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return str(msg)[:300]


def from_package(package: Any, cfg: Any) -> TritonEngine:
    """A TritonEngine for a package from an ``EngineConfig``.

    Reads ``triton_url`` (default ``localhost:8001``), ``triton_model``
    (default: the package name, which is what ``mmpipe triton-repo`` calls
    the ONNX model; ``NAME_cpu`` on servers with the python backend only),
    ``triton_protocol`` (``grpc``), ``triton_model_version`` (``""`` =
    latest), ``triton_timeout_s`` (10), ``triton_retries`` (3) and
    ``triton_backoff_s`` (0.2).  Fields missing from the config take those
    defaults.
    The package's signature fixes the inputs and outputs, and the server's
    model is checked against it."""
    protocol = getattr(cfg, "triton_protocol", "grpc")
    default_url = "localhost:8001" if protocol == "grpc" else "localhost:8000"
    sig = package.manifest.signature
    return TritonEngine(
        getattr(cfg, "triton_url", None) or default_url,
        getattr(cfg, "triton_model", None) or package.name,
        protocol=protocol,
        model_version=str(getattr(cfg, "triton_model_version", "") or ""),
        timeout_s=getattr(cfg, "triton_timeout_s", 10.0),
        retries=getattr(cfg, "triton_retries", 3),
        backoff_s=getattr(cfg, "triton_backoff_s", 0.2),
        input_specs=[{"name": t.name, "dtype": t.dtype} for t in sig.inputs],
        output_names=[t.name for t in sig.outputs],
    )
