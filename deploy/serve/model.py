"""One served model inside the server deployment: a package, a Predictor,
dynamic batching.

The server deployment (:mod:`deploy.serve.ingress`) holds one
:class:`ModelRuntime` per model it serves and answers HTTP and gRPC itself,
so a request reaches the model in one hop.  A runtime takes three kinds of
calls:

* :meth:`ModelRuntime.infer` with ``kind="model"``: the package
  signature's raw tensors (what Triton's ``NAME`` model takes), answered
  with the heads' logits;
* ``kind="ensemble"``: a BYTES ``RECORD`` tensor of raw record JSON
  (Triton's ``NAME_ensemble``), decoded by ``Predictor.decode`` and padded
  by :func:`pipeline.oip.ensemble_features` (the function Triton's
  preprocess model runs), answered with logits plus ``VALID``/``ERROR``;
* :meth:`ModelRuntime.predict`: raw records, answered with the results'
  JSON lines (:meth:`pipeline.results.ResultBatch.json_lines`, made once);
* :meth:`ModelRuntime.generate` / :meth:`ModelRuntime.generate_stream`:
  raw records to a package's generative head (``NAME_generate``, a
  decoupled model), when the package carries one.

Concurrent calls are merged by a :class:`~deploy.serve.batching.Batcher`
(formed when the engine is free, not by the clock): tensor calls into one
engine call (:func:`pipeline.columnar.pad_concat`, split back with
:func:`pipeline.columnar.cut_rows`), record calls into one
:meth:`~pipeline.columnar.ColumnarBatch.merge` and one
``Predictor.infer_batch``, split back by
:meth:`~pipeline.results.ResultBatch.split`.  Decoding and the engine run in
worker threads (``asyncio.to_thread``): in Ray's throughput mode user code
shares the replica's event loop with Serve's own request handling, which
must keep collecting the next batch while the engine runs.  A failing
engine call is isolated by :func:`pipeline.engines.base.run_isolated` (one
call's tensors cannot fail the others; an unavailable engine fails them all
at once).

Generation is not batched across calls (each call decodes its own records
together, ``generate.batch_size`` at a time): the decoding loop is a
blocking numpy / ONNX Runtime loop, run in a thread of its own per call so
the event loop keeps serving; :func:`thread_events` hands its token events
to the event loop as they are chosen, which is what makes streaming stream.

A model whose package fails to load (bad checksum, missing variant) stays
in the replica and says so: it reports not ready and answers every
inference call with 503, rather than crash-looping where nobody can ask it
why.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from deploy.serve.batching import NO_ARRIVAL, Arrival, Batcher
from deploy.serve.config import ONLINE_MEDIA, UserConfig
from pipeline.columnar import ColumnarBatch, cut_rows, pad_concat
from pipeline.config import Settings
from pipeline.engines import create_engine
from pipeline.engines.base import EngineUnavailable, Isolated, run_isolated
from pipeline.errors import PackageError
from pipeline.generate import GenerationResult, Generator, Sampling, TokenEvent
from pipeline.log import log_event
from pipeline.metrics import Metrics
from pipeline.oip import (
    DATATYPES,
    ENSEMBLE_SUFFIX,
    GENERATE_INPUTS,
    GENERATE_OUTPUTS,
    GENERATE_SUFFIX,
    PREPROCESS_OUTPUTS,
    RECORD,
    TOKEN_OFFSETS,
    OipError,
    Spec,
    TensorSpecLike,
    ensemble_features,
    model_config,
    tensor_metadata,
    validate_inputs,
)
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.results import ResultBatch

logger = logging.getLogger(__name__)

ENSEMBLE_EXTRA = (*PREPROCESS_OUTPUTS, TOKEN_OFFSETS)
"""What the ensemble adds to the model's outputs (names shared with the Triton repository)."""
_DEFAULTS = UserConfig()
_SUFFIX = {"model": "", "ensemble": ENSEMBLE_SUFFIX, "generate": GENERATE_SUFFIX}
"""Served name of each kind of call: ``NAME``, ``NAME_ensemble``, ``NAME_generate``."""
T = TypeVar("T")


def _generate_specs() -> tuple[list[Spec], list[Spec]]:
    """``NAME_generate``'s tensors (:data:`pipeline.oip.GENERATE_INPUTS` /
    ``GENERATE_OUTPUTS``) as signature specs: the records axis is the
    ``batch`` dimension, every output one ``[1]`` token event."""
    def dims(shape: tuple[int, ...]) -> list[int | str]:
        return ["batch" if d == -1 else d for d in shape]

    ins = [Spec(n, DATATYPES[t].name, dims(shape)) for n, t, shape, _ in GENERATE_INPUTS]
    outs = [Spec(n, DATATYPES[t].name, [1]) for n, t in GENERATE_OUTPUTS]
    return ins, outs


GENERATE_SPECS = _generate_specs()
OPTIONAL_INPUTS = frozenset(n for n, _, _, optional in GENERATE_INPUTS if optional)


async def thread_events(produce: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Iterate a blocking iterator in a thread of its own, handing each item
    to the event loop as soon as it exists (the first before the last is
    made).  An exception from the iterator is raised here; when the consumer
    stops early (a client went away) the thread stops at its next item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            stop.set()

    def run() -> None:
        try:
            for item in produce():
                if stop.is_set():
                    return
                put((False, item))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((True, exc))
            return
        put((True, None))

    threading.Thread(target=run, name="mmpipe-generate", daemon=True).start()
    try:
        while True:
            done, item = await queue.get()
            if done:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()


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


@dataclass
class _TensorCall:
    """One tensor call waiting for a batch."""

    enqueued: float
    feeds: dict[str, np.ndarray]
    dims: dict[str, int]


@dataclass
class _RecordsCall:
    """One /v1 call's decoded records waiting for a batch."""

    enqueued: float
    batch: ColumnarBatch


class ModelRuntime:
    """One model package behind dynamic batching (see the module docstring)."""

    def __init__(self, package: str, name: str, workload: str, settings: Settings, metrics: Metrics,
                 threads: int) -> None:
        self.name = name
        self.version = ""
        self.labels = {"path": "online", "workload": workload, "model": name}
        self.metrics = metrics
        self.predictor: Predictor | None = None
        self.generator: Generator | None = None
        self.load_error: str | None = None
        try:
            self._load(package, workload, settings, threads)
        except Exception as exc:  # any load failure: not ready, never serving
            self.load_error = f"{type(exc).__name__}: {exc}"
            log_event(logger, logging.ERROR, "model_load_failed", model=name, error=self.load_error[:2000])
        self.bind_metrics()
        self._tensors: Batcher[_TensorCall, dict[str, np.ndarray] | Failure] = Batcher(
            self._tensor_batch, _DEFAULTS.max_batch_size, _DEFAULTS.batch_wait_timeout_s)
        self._records: Batcher[_RecordsCall, ResultBatch] = Batcher(
            self._records_batch, _DEFAULTS.max_batch_size, _DEFAULTS.batch_wait_timeout_s)

    def bind_metrics(self) -> None:
        """The model's metric children, looked up once: a ``labels()`` call
        per request is measurable on the replica's one event loop."""
        m = self.metrics
        self._queue_depth = m.queue_depth.labels(**self.labels)
        self._queue_wait = m.stage_seconds.labels(**self.labels, stage="queue")
        self._request = m.request_seconds.labels(**self.labels)
        self._records_ok = m.records.labels(**self.labels, outcome="ok")
        self._infer_seconds = m.stage_seconds.labels(**self.labels, stage="infer")
        self._batch_size = m.batch_size.labels(**self.labels)

    def _load(self, package: str, workload: str, cfg: Settings, threads: int) -> None:
        pkg = load_package(package)
        if pkg.spec.name != workload:
            raise PackageError(f"package {pkg.name} serves workload {pkg.spec.name!r}, configured as {workload!r}")
        engine_cfg = cfg.engine.model_copy()
        if "threads" not in cfg.engine.model_fields_set:
            engine_cfg.threads = threads
        engine = create_engine(pkg, engine_cfg)
        self.predictor = Predictor(
            pkg, engine, limits=cfg.limits, media=ONLINE_MEDIA, batch_size=cfg.predict.batch_size,
            path="online", metrics=self.metrics,
        )
        if any(v.startswith("generate-") for v in pkg.manifest.variants):
            # Online callers send media inline only (ONLINE_MEDIA): never make the server read its files.
            self.generator = Generator(pkg, engine_cfg, cfg.generate, cfg.limits, media=ONLINE_MEDIA)
        self.version = pkg.version
        self.labels = {"path": "online", "workload": pkg.spec.name, "model": pkg.name}
        self.max_batch_records = self.predictor.pre.limits.max_batch_records
        sig = pkg.manifest.signature
        self.inputs: list[TensorSpecLike] = list(sig.inputs)
        self.outputs: list[TensorSpecLike] = list(sig.outputs)
        text = pkg.spec.preprocessing.text
        self.seq_len = text.max_length if text is not None else None
        pre = self.predictor.pre
        self.vocab = pre.text.vocab_size if pre.text is not None else None
        # Graph names: a brought model may call its token ids anything.
        self.ids_input = pre.input_name("text.input_ids") if pre.text else None
        self.pad_values: dict[str, int | float] = (
            {self.ids_input: pre.text.pad_id} if pre.text is not None and self.ids_input else {})
        self.var_axes = {s.name: tuple(i for i, d in enumerate(s.shape) if isinstance(d, str) and d != "batch")
                         for s in [*self.inputs, *self.outputs]}
        self.row_dims = {s.name: [self.seq_len if d == "sequence" else int(d) for d in s.shape[1:]]
                         for s in self.inputs}
        token_heads = any(h.type == "token" for h in pkg.spec.heads)
        valid, error, message = PREPROCESS_OUTPUTS
        extra: list[TensorSpecLike] = [Spec(valid, "bool", ["batch", 1]), Spec(error, "object", ["batch", 1]),
                                       Spec(message, "object", ["batch", 1])]
        if self.seq_len is not None and token_heads:
            extra.append(Spec(TOKEN_OFFSETS, "int64", ["batch", self.seq_len, 2]))
        self.ensemble_inputs: list[TensorSpecLike] = [Spec(RECORD, "object", ["batch", 1])]
        self.ensemble_outputs: list[TensorSpecLike] = [*self.outputs, *extra]

    # -- configuration ------------------------------------------------------------------
    def reconfigure(self, uc: UserConfig) -> None:
        """Apply batching settings without a restart (from the next batch on)."""
        for batcher in (self._tensors, self._records):
            batcher.configure(uc.max_batch_size, uc.batch_wait_timeout_s)

    def arrival(self, kind: str) -> Arrival:
        """Announce a call of ``kind`` (``model``, ``ensemble``, ``records``)
        whose request is still being read: a batch that could take it waits
        for it (see :mod:`deploy.serve.batching`).  Use it as a ``with``
        block and hand it to :meth:`infer` / :meth:`predict`."""
        if self.predictor is None or kind == "generate":
            return NO_ARRIVAL
        return (self._records if kind == "records" else self._tensors).arrival()

    # -- status -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.predictor is not None

    def not_ready(self) -> Failure:
        return Failure(503, f"model {self.name!r} is not ready: its package failed to load (see the server log)")

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "ready": self.ready, "version": self.version}
        if self.predictor is not None:
            out.update(engine=self.predictor.engine.name, provider=self.predictor.engine.provider)
        return out

    def _specs(self, kind: str) -> tuple[list[TensorSpecLike], list[TensorSpecLike]]:
        if kind == "generate":
            return list(GENERATE_SPECS[0]), list(GENERATE_SPECS[1])
        return (self.inputs, self.outputs) if kind == "model" else (self.ensemble_inputs, self.ensemble_outputs)

    def _platform(self, kind: str) -> str:
        assert self.predictor is not None
        engine = self.predictor.engine.name
        if kind != "model":
            return {"ensemble": "ensemble", "generate": "python"}[kind]  # as Triton names its twins
        return "onnxruntime_onnx" if engine == "onnxruntime" else engine

    def metadata(self, kind: str) -> dict[str, Any] | Failure:
        """Model metadata as ``GET /v2/models/{name}`` returns it."""
        if self.predictor is None:
            return self.not_ready()
        ins, outs = self._specs(kind)
        return {
            "name": f"{self.name}{_SUFFIX[kind]}",
            "versions": [self.version], "platform": self._platform(kind),
            "inputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in ins],
            "outputs": [tensor_metadata(t.name, t.dtype, t.shape) for t in outs],
        }

    def config(self, kind: str, uc: UserConfig) -> dict[str, Any] | Failure:
        """The model's configuration in Triton's JSON form (``GET /v2/models/{name}/config``)."""
        if self.predictor is None:
            return self.not_ready()
        ins, outs = self._specs(kind)
        name = f"{self.name}{_SUFFIX[kind]}"
        if kind == "generate":
            return self._generate_config(name, ins, outs)
        return model_config(name, self._platform(kind), ins, outs, max_batch_size=self.max_batch_records,
                            preferred=[uc.max_batch_size], delay_us=int(uc.batch_wait_timeout_s * 1e6))

    def _generate_config(self, name: str, ins: list[TensorSpecLike], outs: list[TensorSpecLike]) -> dict[str, Any]:
        """``NAME_generate`` as Triton configures its decoupled twin: no
        batch axis (the records are the ``RECORD`` vector), full dims, the
        optional inputs marked, ``model_transaction_policy.decoupled``."""

        def full(t: TensorSpecLike) -> list[int]:
            return [d if isinstance(d, int) else -1 for d in t.shape]

        cfg = model_config(name, "", ins, outs, max_batch_size=0)
        cfg["backend"] = self._platform("generate")
        for entry, t in zip([*cfg["input"], *cfg["output"]], [*ins, *outs], strict=True):
            entry["dims"] = full(t)
            if t.name in OPTIONAL_INPUTS:
                entry["optional"] = True
        cfg["model_transaction_policy"] = {"decoupled": True}
        return cfg

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
        arrival: Arrival = NO_ARRIVAL,
    ) -> TensorReply | Failure:
        """Raw tensors in, logits out (``kind`` ``model`` or ``ensemble``)."""
        if self.predictor is None:
            return self.not_ready()
        if kind == "generate":
            return Failure(400, f"model '{self.name}{GENERATE_SUFFIX}' is decoupled (one response per token): "
                           "stream it with gRPC ModelStreamInfer, or POST /v1/WORKLOAD/generate")
        t0 = time.perf_counter()
        specs_in, specs_out = self._specs(kind)
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
        if kind == "model":
            outputs = await self._run_tensors(inputs, dims, arrival)
        else:
            outputs = await self._run_ensemble(inputs[RECORD], arrival)
        if isinstance(outputs, Failure):
            return outputs
        if kind == "model":
            self._records_ok.inc(dims["batch"])
        self._request.observe(time.perf_counter() - t0)
        return TensorReply({n: outputs[n] for n in requested or names}, self.version)

    async def _run_tensors(self, feeds: dict[str, np.ndarray], dims: dict[str, int], arrival: Arrival
                           ) -> dict[str, np.ndarray] | Failure:
        self._queue_depth.inc()
        return await self._tensors.submit(_TensorCall(time.perf_counter(), feeds, dims), arrival)

    async def _run_ensemble(self, records: np.ndarray, arrival: Arrival) -> dict[str, np.ndarray] | Failure:
        """Records decoded into a columnar batch and padded to the model's
        length (Triton's preprocess model runs the same two functions), then
        the model like any tensor call."""
        assert self.predictor is not None
        predictor, seq_len, dims = self.predictor, self.seq_len, self.row_dims
        raws = [bytes(r) if not isinstance(r, str) else r.encode("utf-8") for r in records.reshape(-1)]

        def featurize() -> tuple[dict[str, np.ndarray], int]:
            batch = predictor.decode(raws)
            return ensemble_features(predictor.pre, batch, seq_len, dims), len(batch)

        feats, ok = await asyncio.to_thread(featurize)
        call_dims = {"batch": len(raws)}
        if seq_len is not None:
            call_dims["sequence"] = seq_len
        outputs = await self._run_tensors({s.name: feats[s.name] for s in self.inputs}, call_dims, arrival)
        if isinstance(outputs, Failure):
            return outputs
        outputs.update({n: feats[n] for n in ENSEMBLE_EXTRA if n in feats})
        self._records_ok.inc(ok)  # rejections: counted by decode
        return outputs

    async def _tensor_batch(self, calls: list[_TensorCall]) -> list[dict[str, np.ndarray] | Failure]:
        """The tensor batcher's engine call: merged calls in a worker thread."""
        self._dequeued(calls)
        return await asyncio.to_thread(self._engine_run, calls)

    def _engine_run(self, calls: list[_TensorCall]) -> list[dict[str, np.ndarray] | Failure]:
        """One engine call for the merged calls (a worker thread); a call the
        engine fails on is isolated by the one rule (``run_isolated``)."""
        assert self.predictor is not None
        engine = self.predictor.engine
        t0 = time.perf_counter()

        def run(idx: list[int]) -> dict[str, np.ndarray]:
            part = [calls[i] for i in idx]
            feeds = {s.name: pad_concat([c.feeds[s.name] for c in part], self.var_axes[s.name],
                                        self.pad_values.get(s.name, 0)) for s in self.inputs}
            return engine.run(feeds)

        def failed(exc: BaseException, n: int) -> None:
            event = "engine_unavailable" if isinstance(exc, EngineUnavailable) else "engine_failed"
            log_event(logger, logging.ERROR, event, model=self.name, exc_type=type(exc).__name__, calls=n)

        out: list[dict[str, np.ndarray] | Failure] = [Failure(500, "")] * len(calls)
        for idx, got in run_isolated(run, len(calls), failed):
            if isinstance(got, str):
                msg = ("inference failed: the engine is unavailable" if got == Isolated.UNAVAILABLE
                       else "inference failed (see the server log)")
                for i in idx:
                    out[i] = Failure(503 if got == Isolated.UNAVAILABLE else 500, msg)
                continue
            for i, part in zip(idx, self._split([calls[i] for i in idx], got), strict=True):
                out[i] = part
        rows = sum(c.dims["batch"] for c in calls)
        self._infer_seconds.observe(time.perf_counter() - t0)
        self._batch_size.observe(rows)
        return out

    def _split(self, calls: list[_TensorCall], outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each call's rows (``cut_rows``), variable axes cut back to the
        call's own sizes (so a call gets the shapes Triton would give it)."""
        shapes = {s.name: s.shape for s in self.outputs}
        parts = {n: cut_rows(a, [c.dims["batch"] for c in calls]) for n, a in outputs.items()}
        out = []
        for i, c in enumerate(calls):
            mine = {}
            for n, rows in parts.items():
                arr = rows[i]
                for axis in self.var_axes.get(n, ()):
                    d = shapes[n][axis]
                    if isinstance(d, str) and d in c.dims and axis < arr.ndim:
                        arr = arr[(slice(None),) * axis + (slice(0, c.dims[d]),)]
                mine[n] = np.ascontiguousarray(arr)
            out.append(mine)
        return out

    def _dequeued(self, calls: list[Any]) -> None:
        """Queue wait per call, as the ``queue`` stage of mmpipe_stage_seconds."""
        now = time.perf_counter()
        self._queue_depth.dec(len(calls))
        for c in calls:
            self._queue_wait.observe(now - c.enqueued)

    # -- records --------------------------------------------------------------------------------
    async def predict(self, records: list[Any], arrival: Arrival = NO_ARRIVAL) -> list[bytes] | Failure:
        """Raw records in (dicts, JSON text or bytes), each record's result
        as one JSON document out, in order; a record that fails decoding
        gets its own error result."""
        if self.predictor is None:
            return self.not_ready()
        t0 = time.perf_counter()
        batch = await asyncio.to_thread(self.predictor.decode, records)
        if len(batch):
            self._queue_depth.inc()
            result = await self._records.submit(_RecordsCall(time.perf_counter(), batch), arrival)
        else:
            arrival.close()
            result = self.predictor.infer_batch(batch)  # rejections only: no engine call
        self._request.observe(time.perf_counter() - t0)
        return result.json_lines()

    async def _records_batch(self, calls: list[_RecordsCall]) -> list[ResultBatch]:
        """Calls' batches merged, one ``infer_batch`` (which chunks by
        ``predict.batch_size``, isolates a record that breaks the engine and
        records the batch metrics), results split back per call."""
        assert self.predictor is not None
        self._dequeued(calls)
        merged = ColumnarBatch.merge([c.batch for c in calls])
        results = await asyncio.to_thread(self.predictor.infer_batch, merged)
        return results.split([c.batch.size for c in calls])

    # -- generation ---------------------------------------------------------------------------
    def no_head(self) -> Failure:
        return Failure(404, f"model {self.name!r} has no generative head (its package carries no exported "
                       "generate-* variant): it tags, it does not generate")

    def generate_inputs(self, inputs: dict[str, np.ndarray]) -> tuple[list[Any], int | None]:
        """(records, max_new_tokens) of a ``NAME_generate`` tensor request,
        checked against :data:`pipeline.oip.GENERATE_INPUTS` with the same
        messages as any tensor request (raises :class:`OipError`)."""
        specs = [s for s in GENERATE_SPECS[0] if s.name in inputs or s.name not in OPTIONAL_INPUTS]
        validate_inputs(inputs, specs, max_batch=self.max_batch_records)
        records = [bytes(r) if not isinstance(r, str) else r.encode("utf-8") for r in inputs[RECORD].reshape(-1)]
        new = inputs.get(GENERATE_INPUTS[1][0])
        return records, None if new is None else int(new.reshape(-1)[0])

    async def generate(self, records: list[Any], max_new_tokens: int | None,
                       sampling: Sampling | None) -> list[GenerationResult] | Failure:
        """One :class:`GenerationResult` per record, in order (a rejected
        record gets its error); raises ``GenerationError`` for a call its
        limits refuse."""
        if self.predictor is None:
            return self.not_ready()
        if self.generator is None:
            return self.no_head()
        gen = self.generator
        return await asyncio.to_thread(gen.generate, records, max_new_tokens=max_new_tokens, sampling=sampling)

    def generate_stream(self, records: list[Any], max_new_tokens: int | None,
                        sampling: Sampling | None) -> AsyncIterator[TokenEvent] | Failure:
        """Token events as they are chosen (``Generator.stream`` in a thread
        of its own); a ``GenerationError`` is raised by the first ``await``."""
        if self.predictor is None:
            return self.not_ready()
        if self.generator is None:
            return self.no_head()
        gen = self.generator
        return thread_events(lambda: gen.stream(records, max_new_tokens=max_new_tokens, sampling=sampling))

    def close(self) -> None:
        if self.predictor is not None:
            self.predictor.close()
