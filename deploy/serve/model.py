"""The model deployment: one model package, one Predictor, dynamic batching.

Each package served gets a deployment of its own (named after the model),
so each has its own replicas, autoscaling and GPU fraction; the ingress
routes to it by model name.  A replica takes three kinds of calls:

* ``infer(kind="model")``: the package signature's raw tensors (what
  Triton's ``NAME`` model takes), answered with the heads' logits;
* ``infer(kind="ensemble")``: a BYTES ``RECORD`` tensor of raw record JSON
  (Triton's ``NAME_ensemble``), featurized with the same code as Triton's
  preprocess model, answered with logits plus ``VALID``/``ERROR``;
* ``predict``: raw records, answered with the Predictor's Results.

Concurrent calls are merged by ``@serve.batch`` (tensor calls into one
engine call; record calls into one ``Predictor.infer``) while decoding runs
per request in worker threads, so the event loop keeps collecting the next
batch while the engine runs.  ``max_batch_size`` and
``batch_wait_timeout_s`` come from the deployment's ``user_config`` and can
be changed on a live service.

A replica whose package fails to load (bad checksum, missing variant)
stays up and says so: it reports not ready and answers every inference
call with 503, rather than crash-looping where nobody can ask it why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from ray import serve

from deploy.serve.config import ONLINE_MEDIA, UserConfig
from deploy.serve.metrics_hub import Publisher
from deploy.triton.preprocess.model import featurize
from exporters.triton_repo import PREPROCESS_OUTPUTS, RECORD, TOKEN_OFFSETS
from pipeline.config import Settings
from pipeline.engines import create_engine
from pipeline.errors import PackageError, Reason
from pipeline.log import log_event, setup_logging
from pipeline.metrics import get_metrics
from pipeline.oip import OipError, Spec, TensorSpecLike, tensor_metadata, validate_inputs
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.preprocess import Prepared
from pipeline.records import Result

logger = logging.getLogger(__name__)

ENSEMBLE_EXTRA = (*PREPROCESS_OUTPUTS, TOKEN_OFFSETS)
"""What the ensemble adds to the model's outputs; names from the Triton
repository writer, so both servers answer alike."""
_DEFAULTS = UserConfig()


@dataclass
class Failure:
    """An answer that is not a result: HTTP status and a message safe to show
    (names, shapes and limits; never record content)."""

    status: int
    message: str


@dataclass
class TensorReply:
    outputs: dict[str, np.ndarray]
    model_version: str


class _EngineFailed(Exception):
    """The engine failed on a call's tensors (logged where it happened)."""


@dataclass
class _Queued:
    """One call waiting for a batch."""

    enqueued: float
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    prepared: list[Prepared] = field(default_factory=list)


def _row_specs(specs: list[TensorSpecLike], seq_len: int | None) -> list[dict[str, Any]]:
    """Per-row dims of each model input, text at a fixed length (what the
    Triton preprocess model's ``featurize`` pads to)."""
    out = []
    for s in specs:
        dims = [seq_len if d == "sequence" else int(d) for d in s.shape[1:]]
        out.append({"name": s.name, "dtype": s.dtype, "dims": dims})
    return out


def merge_feeds(
    items: list[_Queued], specs: list[TensorSpecLike], pad_values: dict[str, int | float],
) -> dict[str, np.ndarray]:
    """Concatenate calls' tensors along the batch axis, padding each variable
    non-batch axis (``sequence``) to the longest.  The fusion model is
    padding-invariant (the attention mask hides pads), so a row's logits do
    not depend on its neighbours' lengths."""
    longest: dict[str, int] = {}
    for it in items:
        for name, n in it.dims.items():
            if name != "batch":
                longest[name] = max(longest.get(name, 0), n)
    merged: dict[str, np.ndarray] = {}
    for s in specs:
        parts = []
        for it in items:
            arr = it.feeds[s.name]
            pads = [(0, 0)] * arr.ndim
            for axis, d in enumerate(s.shape):
                if isinstance(d, str) and d != "batch" and arr.shape[axis] < longest[d]:
                    pads[axis] = (0, longest[d] - arr.shape[axis])
            if any(p != (0, 0) for p in pads):
                arr = np.pad(arr, pads, constant_values=pad_values.get(s.name, 0))
            parts.append(arr)
        merged[s.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return merged


def split_outputs(
    outputs: dict[str, np.ndarray], items: list[_Queued], specs: list[TensorSpecLike],
) -> list[dict[str, np.ndarray]]:
    """Each call's rows of the merged outputs, variable axes cut back to the
    call's own sizes (so a call gets the shapes Triton would give it)."""
    shapes = {s.name: s.shape for s in specs}
    out: list[dict[str, np.ndarray]] = []
    start = 0
    for it in items:
        rows = it.dims["batch"]
        mine = {}
        for name, arr in outputs.items():
            part = arr[start : start + rows]
            index: list[slice] = [slice(None)] * part.ndim
            for axis, d in enumerate(shapes.get(name, [])):
                if isinstance(d, str) and d != "batch" and d in it.dims and axis < part.ndim:
                    index[axis] = slice(0, it.dims[d])
            mine[name] = np.ascontiguousarray(part[tuple(index)])
        out.append(mine)
        start += rows
    return out


# Module-level helpers the class uses are defined above it: Serve pickles the
# decorated class by value at decoration time, with the globals that exist then.
# Replica count and autoscaling are left to the Serve config: set here, a
# config's `num_replicas` would be silently overridden by this autoscaling.
@serve.deployment(
    name="model",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    user_config=_DEFAULTS.model_dump(),
    health_check_period_s=10,
)
class ModelServer:
    """One model package behind dynamic batching (see the module docstring)."""

    def __init__(self, package: str, name: str, workload: str, settings: dict[str, Any]) -> None:
        cfg = Settings.model_validate(settings)
        setup_logging(cfg.log_level)
        self.name = name
        self.version = ""
        self.labels = {"path": "online", "workload": workload, "model": name}
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = get_metrics(self.registry)
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        ctx = serve.get_replica_context()
        self.publisher = Publisher(self.registry, ctx.app_name, f"{ctx.deployment}#{ctx.replica_tag}")
        try:
            self._load(package, workload, cfg)
        except Exception as exc:  # any load failure: not ready, never serving
            self.load_error = f"{type(exc).__name__}: {exc}"
            log_event(logger, logging.ERROR, "model_load_failed", model=name, error=self.load_error[:2000])
        self.publisher.ensure_started()

    def _load(self, package: str, workload: str, cfg: Settings) -> None:
        pkg = load_package(package)
        if pkg.spec.name != workload:
            raise PackageError(f"package {pkg.name} serves workload {pkg.spec.name!r}, configured as {workload!r}")
        engine_cfg = cfg.engine.model_copy()
        if "threads" not in cfg.engine.model_fields_set:
            # One intra-op thread per CPU this replica reserved: replicas
            # sharing a node must not each spin up a thread per core.
            import ray

            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            engine_cfg.threads = max(1, int(cpus))
        engine = create_engine(pkg, engine_cfg)
        self.predictor = Predictor(
            pkg, engine, limits=cfg.limits, media=ONLINE_MEDIA, batch_size=cfg.predict.batch_size,
            path="online", metrics=self.metrics,
        )
        self.version = pkg.version
        self.labels = {"path": "online", "workload": pkg.spec.name, "model": pkg.name}
        self.max_batch_records = self.predictor.pre.limits.max_batch_records
        sig = pkg.manifest.signature
        self.inputs: list[TensorSpecLike] = list(sig.inputs)
        self.outputs: list[TensorSpecLike] = list(sig.outputs)
        text = pkg.spec.preprocessing.text
        self.seq_len = text.max_length if text is not None else None
        self.vocab = self.predictor.pre.text.vocab_size if self.predictor.pre.text is not None else None
        # Graph names: a brought model may call its token ids anything.
        self.ids_input = self.predictor.pre.input_name("text.input_ids") if self.predictor.pre.text else None
        self.pad_values: dict[str, int | float] = (
            {self.ids_input: self.predictor.pre.text.pad_id}
            if self.predictor.pre.text is not None and self.ids_input else {}
        )
        token_heads = any(h.type == "token" for h in pkg.spec.heads)
        self.ensemble_inputs: list[TensorSpecLike] = [Spec(RECORD, "object", ["batch", 1])]
        valid, error, message = PREPROCESS_OUTPUTS
        extra = [Spec(valid, "bool", ["batch", 1]), Spec(error, "object", ["batch", 1]),
                 Spec(message, "object", ["batch", 1])]
        if self.seq_len is not None and token_heads:
            extra.append(Spec(TOKEN_OFFSETS, "int64", ["batch", self.seq_len, 2]))
        self.ensemble_outputs: list[TensorSpecLike] = [*self.outputs, *extra]
        self.row_specs = _row_specs(self.inputs, self.seq_len)

    # -- configuration ------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply ``user_config`` (batching) without a restart."""
        uc = UserConfig.model_validate(user_config or {})
        for method in (self._tensor_batch, self._records_batch):
            method.set_max_batch_size(uc.max_batch_size)
            method.set_batch_wait_timeout_s(uc.batch_wait_timeout_s)
        log_event(logger, logging.INFO, "batching_configured", model=self.name,
                  max_batch_size=uc.max_batch_size, batch_wait_timeout_s=uc.batch_wait_timeout_s)

    # -- status -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def _not_ready(self) -> Failure:
        return Failure(503, f"model {self.name!r} is not ready: its package failed to load (see the server log)")

    async def status(self) -> dict[str, Any]:
        self.publisher.ensure_started()
        out: dict[str, Any] = {"name": self.name, "ready": self.ready, "version": self.version}
        if self.predictor is not None:
            out.update(engine=self.predictor.engine.name, provider=self.predictor.engine.provider)
        return out

    async def metadata(self, kind: str) -> dict[str, Any] | Failure:
        """Model metadata as ``GET /v2/models/{name}`` returns it."""
        if self.predictor is None:
            return self._not_ready()
        ins, outs = (self.inputs, self.outputs) if kind == "model" else (self.ensemble_inputs, self.ensemble_outputs)
        engine = self.predictor.engine.name
        platform = "ensemble" if kind == "ensemble" else ("onnxruntime_onnx" if engine == "onnxruntime" else engine)
        return {
            "name": self.name if kind == "model" else f"{self.name}_ensemble",
            "versions": [self.version], "platform": platform,
            "inputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in ins],
            "outputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in outs],
        }

    # -- tensors ----------------------------------------------------------------------------------
    def _check_values(self, inputs: dict[str, np.ndarray], dims: dict[str, int]) -> None:
        """Values the engine would fail on obscurely: token ids outside the
        vocabulary, text longer than the model's length."""
        if self.seq_len is not None and dims.get("sequence", 0) > self.seq_len:
            raise OipError(
                f"input {self.ids_input!r}: sequence length {dims['sequence']} exceeds the model's maximum "
                f"{self.seq_len}"
            )
        ids = inputs.get(self.ids_input) if self.ids_input else None
        if ids is not None and self.vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise OipError(f"input {self.ids_input!r}: token ids must be in [0, {self.vocab})")

    async def infer(
        self, kind: str, inputs: dict[str, np.ndarray], requested: list[str] | None = None,
    ) -> TensorReply | Failure:
        """Raw tensors in, logits out (``kind`` ``model`` or ``ensemble``)."""
        self.publisher.ensure_started()
        if self.predictor is None:
            return self._not_ready()
        t0 = time.perf_counter()
        specs_in, specs_out = (self.inputs, self.outputs) if kind == "model" else (
            self.ensemble_inputs, self.ensemble_outputs)
        names = [s.name for s in specs_out]
        unknown = [n for n in requested or [] if n not in names]
        try:
            if unknown:
                raise OipError(f"unknown output {unknown[0]!r}; the model gives {names}")
            dims = validate_inputs(inputs, specs_in, max_batch=self.max_batch_records)
            if kind == "model":
                self._check_values(inputs, dims)
        except OipError as exc:
            return Failure(exc.status, exc.message)
        try:
            if kind == "model":
                outputs = await self._run_tensors(inputs, dims)
                self.metrics.records.labels(**self.labels, outcome="ok").inc(dims["batch"])
            else:
                outputs = await self._run_ensemble(inputs[RECORD])
        except _EngineFailed:
            return Failure(500, "inference failed (see the server log)")
        self.metrics.request_seconds.labels(**self.labels).observe(time.perf_counter() - t0)
        self.publisher.mark()
        return TensorReply({n: outputs[n] for n in requested or names}, self.version)

    async def _run_tensors(self, feeds: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
        self.metrics.queue_depth.labels(**self.labels).inc()
        out = await self._tensor_batch(_Queued(time.perf_counter(), feeds=feeds, dims=dims))
        if isinstance(out, _EngineFailed):
            raise out
        return out

    async def _run_ensemble(self, records: np.ndarray) -> dict[str, np.ndarray]:
        """Triton's preprocess model's own ``featurize`` (text padded to the
        model's length, bad records as zero rows with their reason), then the
        model like any tensor call."""
        assert self.predictor is not None
        raws = [bytes(r) if not isinstance(r, str) else r.encode("utf-8") for r in records.reshape(-1)]
        t0 = time.perf_counter()
        feats = await asyncio.to_thread(featurize, self.predictor.pre, raws, self.row_specs, self.seq_len)
        self.metrics.stage_seconds.labels(**self.labels, stage="preprocess").observe(time.perf_counter() - t0)
        feeds = {s.name: feats[s.name] for s in self.inputs}
        dims = {"batch": len(raws)}
        if self.seq_len is not None:
            dims["sequence"] = self.seq_len
        outputs = await self._run_tensors(feeds, dims)
        for name in ENSEMBLE_EXTRA:
            if name in feats:
                outputs[name] = feats[name]
        valid_name, error_name, _ = PREPROCESS_OUTPUTS
        valid = feats[valid_name].reshape(-1)
        self.metrics.records.labels(**self.labels, outcome="ok").inc(int(valid.sum()))
        for code in feats[error_name].reshape(-1)[~valid]:
            reason = bytes(code).decode("utf-8", "replace") or Reason.BAD_RECORD.value
            self.metrics.records.labels(**self.labels, outcome="error").inc()
            self.metrics.errors.labels(**self.labels, reason=reason).inc()
        return outputs

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _tensor_batch(self, items: list[_Queued]) -> list[dict[str, np.ndarray] | _EngineFailed]:
        self._dequeued(items)
        return await self._engine_run(items)

    async def _engine_run(self, items: list[_Queued]) -> list[dict[str, np.ndarray] | _EngineFailed]:
        """One engine call for the merged calls; if it fails, each call alone,
        so one caller's tensors cannot fail the others' requests."""
        assert self.predictor is not None
        feeds = merge_feeds(items, self.inputs, self.pad_values)
        rows = sum(it.dims["batch"] for it in items)
        t0 = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self.predictor.engine.run, feeds)
        except Exception as exc:
            log_event(logger, logging.ERROR, "engine_failed", model=self.name, exc_type=type(exc).__name__,
                      batch=rows)
            if len(items) == 1:
                return [_EngineFailed()]
            return [r for it in items for r in await self._engine_run([it])]
        self.metrics.stage_seconds.labels(**self.labels, stage="infer").observe(time.perf_counter() - t0)
        self.metrics.batch_size.labels(**self.labels).observe(rows)
        return split_outputs(outputs, items, self.outputs)

    def _dequeued(self, items: list[_Queued]) -> None:
        """Queue wait per call, as the ``queue`` stage of mmpipe_stage_seconds."""
        now = time.perf_counter()
        for it in items:
            self.metrics.queue_depth.labels(**self.labels).dec()
            self.metrics.stage_seconds.labels(**self.labels, stage="queue").observe(now - it.enqueued)

    # -- records --------------------------------------------------------------------------------
    async def predict(self, records: list[Any]) -> list[dict[str, Any]] | Failure:
        """Raw records in (dicts, JSON text or bytes), Results out in order;
        a record that fails decoding gets its own error result."""
        self.publisher.ensure_started()
        if self.predictor is None:
            return self._not_ready()
        t0 = time.perf_counter()
        predictor = self.predictor
        items = await asyncio.to_thread(lambda: [predictor.prepare(r) for r in records])
        self.metrics.stage_seconds.labels(**self.labels, stage="preprocess").observe(time.perf_counter() - t0)
        prepared = [p for p in items if isinstance(p, Prepared)]
        if prepared:
            self.metrics.queue_depth.labels(**self.labels).inc()
            answered = iter(await self._records_batch(_Queued(time.perf_counter(), prepared=prepared)))
            items = [next(answered) if isinstance(p, Prepared) else p for p in items]
        self.metrics.request_seconds.labels(**self.labels).observe(time.perf_counter() - t0)
        self.publisher.mark()
        return [r.model_dump(mode="json", exclude_none=True) for r in items if isinstance(r, Result)]

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size, batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _records_batch(self, items: list[_Queued]) -> list[list[Result]]:
        assert self.predictor is not None
        self._dequeued(items)
        flat = [p for it in items for p in it.prepared]
        # Predictor.infer chunks by predict.batch_size, isolates a record
        # that breaks the engine and records the batch metrics itself.
        results = await asyncio.to_thread(self.predictor.infer, flat)
        out, start = [], 0
        for it in items:
            out.append(results[start : start + len(it.prepared)])
            start += len(it.prepared)
        return out

    def __del__(self) -> None:
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.close()
        predictor = getattr(self, "predictor", None)
        if predictor is not None:
            predictor.close()
