"""Triton python-backend model NAME_generate: raw records in, tokens streamed out.

A *decoupled* model (``model_transaction_policy { decoupled: true }``): one
request gets many responses, sent through the request's response sender as
the tokens are chosen, then a last empty one flagged
``TRITONSERVER_RESPONSE_COMPLETE_FINAL``.  Clients use gRPC's
``ModelStreamInfer`` (``tritonclient.grpc``: ``start_stream`` +
``async_stream_infer``); plain HTTP/gRPC ``infer`` cannot take more than one
response.

The tensor contract is ``pipeline.oip``'s (``GENERATE_INPUTS`` /
``GENERATE_OUTPUTS``, one home for Triton and Ray Serve): ``RECORD`` BYTES
``[n]`` (one record JSON per element, media base64; a record's ``messages``
are its conversation) and the optional ``MAX_NEW_TOKENS`` INT32 ``[1]``.
Each response is one :class:`pipeline.generate.TokenEvent` as ``[1]``
tensors (:func:`pipeline.oip.token_event_tensors`): which record (``INDEX``,
``ID``), the text delta and token id, the finish reason, or a rejected
record's ``ERROR_CODE`` / ``ERROR_MESSAGE`` (the other records go on).  A
request the limits refuse as a whole (``MAX_NEW_TOKENS`` over the limit) gets
one error response, then the final flag.

The decoding loop is ``pipeline.generate.Generator`` (the one every path
runs), loaded once per model instance from the package copy beside this
file; its settings come from the config's parameters: ``GENERATE`` (the
``generate`` settings section as JSON), ``LIMITS`` (``limits`` as JSON, empty:
the package's), ``ALLOWED_URI_SCHEMES`` (empty: media URIs refused) and
``MMPIPE_PYTHONPATH`` (as for the preprocess model).  Requests are decoded
one after another on an instance; more instances decode side by side.
Generated text is record content (patient data for medical): nothing here
logs it, nor prompts or token ids.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests)
    pb_utils = None

logger = logging.getLogger("mmpipe.triton.generate")


def _params(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def add_pythonpath(value: str) -> None:
    """Make ``pipeline`` importable from the configured source roots (the
    ``MMPIPE_PYTHONPATH`` parameter; this must run before ``pipeline`` can
    be imported, so it cannot live there)."""
    for entry in reversed([p for p in value.split(":") if p]):
        if Path(entry).is_dir() and entry not in sys.path:
            sys.path.insert(0, entry)


def load_generator(package_dir: Path, params: dict[str, str], instance_kind: str):
    """The package's :class:`~pipeline.generate.Generator` with the settings
    the config's parameters carry; a GPU instance asks ONNX Runtime for the
    GPU providers (falling back to the CPU where it has none)."""
    from pipeline.config import EngineConfig, GenerateConfig, Limits, MediaConfig
    from pipeline.generate import Generator
    from pipeline.package import load_package_copy

    pkg = load_package_copy(package_dir)
    config = GenerateConfig.model_validate_json(params.get("GENERATE") or "{}")
    limits = Limits.model_validate_json(params["LIMITS"]) if params.get("LIMITS") else None
    threads = int(params.get("ORT_INTRA_OP_THREADS", "0") or 0)
    engine = EngineConfig(device="cuda" if instance_kind.upper() == "GPU" else "cpu", threads=threads)
    schemes = [s.strip() for s in params.get("ALLOWED_URI_SCHEMES", "").split(",") if s.strip()]
    return Generator(pkg, engine, config, limits, media=MediaConfig(allowed_uri_schemes=schemes))


def request_inputs(records: np.ndarray, max_new_tokens: np.ndarray | None) -> tuple[list[bytes], int | None]:
    """The records (one per element, any shape flattened) and the optional
    token budget of one request."""
    raws = [bytes(r) if not isinstance(r, str) else r.encode() for r in np.asarray(records).reshape(-1).tolist()]
    if max_new_tokens is None:
        return raws, None
    flat = np.asarray(max_new_tokens).reshape(-1)
    if flat.size != 1:
        from pipeline.generate import GenerationError

        raise GenerationError(f"MAX_NEW_TOKENS must hold one value; it holds {flat.size}")
    return raws, int(flat[0])


def event_tensors(generator, raws: list[bytes], max_new_tokens: int | None,
                  cancelled: Callable[[], bool] = lambda: False) -> Iterator[dict[str, np.ndarray]]:
    """``NAME_generate``'s responses for one request, as tensors: one per
    :class:`~pipeline.generate.TokenEvent` of ``Generator.stream``.  Stops
    early when ``cancelled()`` says the client went away.  A whole-call
    refusal raises :class:`~pipeline.generate.GenerationError` before the
    first response."""
    from pipeline.oip import token_event_tensors

    for event in generator.stream(raws, max_new_tokens=max_new_tokens):
        yield token_event_tensors(event)
        if cancelled():
            return


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise RuntimeError("NAME_generate streams many responses per request: its config needs "
                               "model_transaction_policy { decoupled: true }")
        params = _params(config)
        add_pythonpath(params.get("MMPIPE_PYTHONPATH", ""))
        try:
            import pipeline  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "mmpipe's 'pipeline' package is not importable by Triton's python backend: set the "
                "MMPIPE_PYTHONPATH parameter (mmpipe triton-repo --pythonpath DIR) or install mmpipe in "
                f"the backend's Python environment ({exc})"
            ) from exc
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.generator = load_generator(version_dir / params.get("PACKAGE_DIR", "package"), params,
                                        args.get("model_instance_kind", "CPU"))
        self.output_names = [o["name"] for o in config["output"]]
        pkg = self.generator.package
        pb_utils.Logger.log_info(
            f"mmpipe generate ready: package {pkg.name} v{pkg.version}, head {self.generator.head}, "
            f"variant {self.generator.variant}, provider {self.generator.backend.provider}, "
            f"max_new_tokens {self.generator.max_new_tokens}"
        )

    def execute(self, requests: Iterable[Any]) -> None:
        """Decoupled: every response goes through the request's sender, so
        this returns None."""
        for request in requests:
            self._serve(request, request.get_response_sender())
        return None

    def _serve(self, request: Any, sender: Any) -> None:
        from pipeline.generate import GenerationError
        from pipeline.log import log_event

        cancelled = getattr(sender, "is_cancelled", lambda: False)
        sent = 0
        try:
            records = pb_utils.get_input_tensor_by_name(request, "RECORD")
            budget = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
            raws, new = request_inputs(records.as_numpy(), None if budget is None else budget.as_numpy())
            for tensors in event_tensors(self.generator, raws, new, cancelled):
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, tensors[name]) for name in self.output_names]))
                sent += 1
        except GenerationError as exc:  # the whole call is refused; the message names limits, not content
            _send_quietly(sender, pb_utils.InferenceResponse(error=_error(str(exc), invalid=True)))
        except Exception as exc:
            log_event(logger, logging.ERROR, "triton_generate_failed", error=type(exc).__name__, responses=sent)
            _send_quietly(sender, pb_utils.InferenceResponse(error=_error(f"generation failed: {type(exc).__name__}")))
        _send_quietly(sender, None, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.generator = None


def _send_quietly(sender: Any, response: Any, flags: int = 0) -> None:
    """Send, where the client may be gone already (a cancelled stream): the
    instance must stay up for the next request."""
    from pipeline.log import log_event

    try:
        if response is None:
            sender.send(flags=flags)
        else:
            sender.send(response, flags=flags)
    except Exception as exc:
        log_event(logger, logging.WARNING, "triton_generate_send_failed", error=type(exc).__name__)


def _error(message: str, invalid: bool = False) -> Any:
    """A TritonError, with the INVALID_ARG code where this stub knows codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if invalid else None
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
