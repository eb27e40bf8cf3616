"""The Open Inference Protocol over gRPC: Triton's ``GRPCInferenceService``
(the protobuf ``tritonclient`` ships) mapped onto the same calls the HTTP
routes make, so ``tritonclient.grpc`` works against Serve as against Triton.

Serve's gRPC proxy (``grpc_options.grpc_servicer_functions`` naming
:func:`add_servicer`, tritonclient's servicer registration)
calls the server deployment's method of the RPC's name with the request
message; :class:`GrpcMethods` is that set of methods, mixed into the
deployment.  Errors carry a gRPC status code and the message the HTTP route
would give (the same :class:`~pipeline.oip.OipError` wording).
``ModelStreamInfer`` (bidirectional: the deployment's method is an async
generator over the request stream) carries ``NAME_generate``'s token events,
flagged as Triton flags a decoupled model's responses (``FINAL``); a failed
request on the stream is an ``error_message`` response, as on Triton.
Only the codec lives here; what a call means is the deployment's.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from pipeline.oip import (
    GENERATE_OUTPUTS,
    OipError,
    datatype_of,
    dtype_of,
    tensor_from_bytes,
    tensor_to_bytes,
    token_event_tensors,
)

# tritonclient's generated classes say they live in ``grpc_service_pb2``
# (the proto's own module name), which nothing can import: Serve's classic
# proxy pickles the request to hand it to a replica, and unpickling needs
# that name.  Alias it wherever this module is imported (the proxy imports
# it through SERVICER, replicas through the server).
sys.modules.setdefault(service_pb2.ModelInferRequest.__module__, service_pb2)
sys.modules.setdefault(model_config_pb2.ModelConfig.__module__, model_config_pb2)


STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
          500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}
"""HTTP status of an answer -> gRPC status code (Triton answers argument errors with INVALID_ARGUMENT)."""

SERVICER = "deploy.serve.grpc_oip.add_servicer"
"""What a Serve config's ``grpc_options.grpc_servicer_functions`` lists:
tritonclient's ``add_GRPCInferenceServiceServicer_to_server`` behind the
module alias above."""


def add_servicer(servicer: Any, server: Any) -> None:
    """Register Triton's ``GRPCInferenceService`` on Serve's gRPC proxy."""
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def abort(context: Any, status: int, message: str) -> None:
    """Mark the call failed with the gRPC code of ``status`` and ``message``."""
    context.set_code(STATUS.get(status, grpc.StatusCode.UNKNOWN))
    context.set_details(message)


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise OipError(f"input {name!r}: datatype {datatype} must be sent in raw_input_contents")
    values = list(getattr(contents, field))
    count = int(np.prod(shape)) if shape else 1
    if len(values) != count:
        raise OipError(f"input {name!r}: {len(values)} elements for shape {list(shape)} ({count} expected)")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = values
        return arr.reshape(shape)
    return np.asarray(values, dtype=dtype_of(datatype)).reshape(shape)


def parse_request(req: Any) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """(inputs by name, requested output names or ``None``) of a
    ``ModelInferRequest``; raises :class:`OipError` as the HTTP codec does."""
    if not req.inputs:
        raise OipError("request needs at least one input")
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise OipError(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        if t.name in inputs:
            raise OipError(f"input {t.name!r} is given twice")
        if any(k.startswith("shared_memory") for k in t.parameters):
            raise OipError(f"input {t.name!r}: shared-memory tensors are not supported by this server")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise OipError(f"input {t.name!r}: shape {list(shape)} has a negative dimension")
        dtype_of(t.datatype)
        if raw:
            inputs[t.name] = tensor_from_bytes(t.name, t.datatype, shape, raw[i])
        else:
            inputs[t.name] = _from_contents(t.name, t.datatype, shape, t.contents)
    requested = [o.name for o in req.outputs] if req.outputs else None
    return inputs, requested


def infer_response(model: str, version: str, outputs: Mapping[str, np.ndarray], request_id: str) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents``
    (what tritonclient's ``as_numpy`` reads)."""
    resp = service_pb2.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        datatype, blob = tensor_to_bytes(arr)
        resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        resp.raw_output_contents.append(blob)
    return resp


# -- ModelStreamInfer (NAME_generate, a decoupled model) ------------------------------------------------------
FINAL = "triton_final_response"
"""Response parameter flagging a request's last response (Triton's decoupled models)."""
EMPTY_FINAL = "triton_enable_empty_final_response"
"""Request parameter: end with an empty response flagged final, instead of flagging the last token's."""


def request_parameters(req: Any) -> dict[str, Any]:
    """A request's ``parameters`` as plain values (whichever of bool / int /
    double / string each carries)."""
    out: dict[str, Any] = {}
    for key, p in req.parameters.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def token_outputs(requested: list[str] | None) -> Callable[[Any], dict[str, np.ndarray]]:
    """What one token event sends (:func:`pipeline.oip.token_event_tensors`),
    limited to the outputs the request names; an unknown name is refused
    before any model work."""
    names = [n for n, _ in GENERATE_OUTPUTS]
    unknown = [n for n in requested or [] if n not in names]
    if unknown:
        raise OipError(f"unknown output {unknown[0]!r}; the model gives {names}")

    def pick(event: Any) -> dict[str, np.ndarray]:
        tensors = token_event_tensors(event)
        return tensors if not requested else {n: tensors[n] for n in requested}

    return pick


def stream_response(infer: Any) -> Any:
    return service_pb2.ModelStreamInferResponse(infer_response=infer)


def stream_error(message: str) -> Any:
    """A failed request on the stream: Triton's ``error_message``, which
    tritonclient hands the stream callback as an ``InferenceServerException``."""
    return service_pb2.ModelStreamInferResponse(error_message=message)


def token_response(model: str, version: str, request_id: str, outputs: Mapping[str, np.ndarray], *,
                   final: bool) -> Any:
    resp = infer_response(model, version, outputs, request_id)
    resp.parameters[FINAL].bool_param = final
    return stream_response(resp)


def final_response(model: str, version: str, request_id: str) -> Any:
    """The empty response that only says "no more for this request"."""
    resp = service_pb2.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    resp.parameters[FINAL].bool_param = True
    return stream_response(resp)


def metadata_response(meta: Mapping[str, Any]) -> Any:
    resp = service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for key in ("inputs", "outputs"):
        for t in meta[key]:
            getattr(resp, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return resp


def config_response(cfg: Mapping[str, Any]) -> Any:
    return service_pb2.ModelConfigResponse(config=json_format.ParseDict(cfg, model_config_pb2.ModelConfig()))


__all__ = ["EMPTY_FINAL", "FINAL", "SERVICER", "STATUS", "abort", "add_servicer", "config_response", "datatype_of",
           "final_response", "infer_response", "metadata_response", "parse_request", "request_parameters",
           "service_pb2", "stream_error", "stream_response", "token_outputs", "token_response"]
