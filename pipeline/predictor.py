"""The Predictor: raw records in, results out.  Every path uses it.

    parse + validate + decode (per record)  ->  collate a padded batch
    ->  engine  ->  postprocess (activations, thresholds, top-k)  ->  Result

A bad record becomes an error Result with a reason code and never affects
the other records of its batch.  The two halves (``prepare`` and ``infer``)
are public so a batch job can decode in CPU tasks and infer in an actor pool.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.columnar import ColumnarBatch, Rejected, pad_concat
from pipeline.config import Limits, MediaConfig, Settings
from pipeline.engines import Engine, EngineUnavailable, create_engine
from pipeline.engines.base import Isolated, run_isolated
from pipeline.errors import PackageError, Reason, RecordError
from pipeline.log import id_hash_key, log_event, require_id_hash_key, safe_id
from pipeline.metrics import Metrics, get_metrics
from pipeline.package import ModelPackage, load_package
from pipeline.postprocess import head_columns
from pipeline.preprocess import Prepared, Preprocessor
from pipeline.records import ErrorInfo, Record, Result
from pipeline.results import ResultBatch
from pipeline.spec import HeadSpec

logger = logging.getLogger(__name__)

RawRecord = bytes | str | dict[str, Any] | Record


def _guess_id(raw: RawRecord) -> str | None:
    """Best-effort id of a record that failed to parse, for its error result."""
    if isinstance(raw, Record):
        return raw.id
    if isinstance(raw, dict):
        rid = raw.get("id")
        return rid if isinstance(rid, str) else None
    try:
        obj = json.loads(raw) if len(raw) < 1 << 26 else None
    except (ValueError, TypeError, RecursionError):
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 256 else None


def _no_rows(head: HeadSpec) -> np.ndarray:
    """Logits of an empty batch (every record of a chunk failed)."""
    return np.zeros((0, 1, len(head.labels)) if head.type == "token" else (0, len(head.labels)), dtype=np.float32)


class Predictor:
    """Turns raw records into results with one model package and one engine."""

    def __init__(
        self,
        package: ModelPackage,
        engine: Engine | None,
        *,
        limits: Limits | None = None,
        media: MediaConfig | None = None,
        batch_size: int = 32,
        path: str = "cli",
        metrics: Metrics | None = None,
        decode_threads: int | None = None,
    ) -> None:
        """``decode_threads``: threads decoding media (default: the CPUs
        this process may use, at most 8; 1 decodes inline)."""
        self.package = package
        self.decode_threads = decode_threads if decode_threads is not None else min(8, len(os.sched_getaffinity(0)))
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: ThreadPoolExecutor | None = None
        self.spec = package.spec
        self.engine = engine
        self.batch_size = batch_size
        self.path = path
        self.pre = Preprocessor.for_package(package, limits, media)
        self._outputs = package.manifest.signature.head_outputs()
        self.metrics = metrics or get_metrics()
        self._labels = {"path": path, "workload": self.spec.name, "model": package.name}
        if self.spec.privacy.hash_ids:
            require_id_hash_key(self.spec.name)
        self._id_key = id_hash_key()
        # Labelled children bound once: a label look-up per record adds up.
        m, lab = self.metrics, self._labels
        self._records_ok = m.records.labels(**lab, outcome="ok")
        self._records_error = m.records.labels(**lab, outcome="error")
        self._stage_pre = m.stage_seconds.labels(**lab, stage="preprocess")
        self._stage_infer = m.stage_seconds.labels(**lab, stage="infer")
        self._stage_post = m.stage_seconds.labels(**lab, stage="postprocess")
        self._batch_size = m.batch_size.labels(**lab)
        self._request = m.request_seconds.labels(**lab)
        self.pre.on_extra_modality = lambda m: self.metrics.ignored_modalities.labels(**self._labels, modality=m).inc()
        if engine is None:
            # Decode-only: ``prepare`` without a model loaded (the batch job's
            # CPU decode tasks); ``infer`` refuses.
            return
        self.metrics.model_info.labels(
            **self._labels, version=package.version, engine=engine.name, provider=engine.provider
        ).set(1)
        log_event(
            logger, logging.INFO, "predictor_ready", model=package.name, version=package.version,
            workload=self.spec.name, engine=engine.name, provider=engine.provider, path=path,
        )

    @classmethod
    def from_settings(cls, settings: Settings, package_dir: str | None = None, *, path: str = "cli") -> Predictor:
        where = package_dir or settings.model_package
        if where is None:
            raise PackageError("no model package given: pass --package or set model_package in the config")
        package = load_package(where)
        engine = create_engine(package, settings.engine)
        return cls(
            package, engine, limits=settings.limits, media=settings.media,
            batch_size=settings.predict.batch_size, path=path,
        )

    # -- results --------------------------------------------------------------
    def error_result(self, record_id: str | None, code: Reason, message: str) -> Result:
        """A rejected record's Result (counted and logged like every rejection)."""
        self._count_rejections([code.value], [record_id or ""])
        return Result(
            id=record_id or "", workload=self.spec.name, model=self.package.name,
            model_version=self.package.version, engine=self.engine.name if self.engine else None,
            provider=self.engine.provider if self.engine else None, error=ErrorInfo(code=code.value, message=message),
        )

    def _count_rejections(self, codes: Sequence[str], ids: Sequence[str]) -> None:
        if not codes:
            return
        self._records_error.inc(len(codes))
        for code, n in Counter(codes).items():
            self.metrics.errors.labels(**self._labels, reason=code).inc(n)
        if logger.isEnabledFor(logging.DEBUG):
            for code, rid in zip(codes, ids, strict=True):
                log_event(logger, logging.DEBUG, "record_rejected", reason=code,
                          record=safe_id(rid, self.spec.privacy.hash_ids, self._id_key) if rid else None,
                          workload=self.spec.name, path=self.path)

    # -- decode ------------------------------------------------------------------
    def _decode_one(self, raw: RawRecord) -> Prepared | tuple[str | None, Reason, str]:
        try:
            return self.pre.prepare(raw)
        except Exception as exc:
            return self._decode_failure(raw, exc)

    def _decode_failure(self, raw: RawRecord, exc: Exception) -> tuple[str | None, Reason, str]:
        if isinstance(exc, RecordError):
            return _guess_id(raw), exc.code, exc.message
        # A decoder bug must not take the batch down.
        log_event(logger, logging.ERROR, "preprocess_bug", exc_type=type(exc).__name__)
        return _guess_id(raw), Reason.BAD_RECORD, f"record could not be processed ({type(exc).__name__})"

    def _decode_pool(self) -> ThreadPoolExecutor | None:
        if self.decode_threads <= 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="mmpipe-decode")
        return self._pool

    def decode(self, raws: Iterable[RawRecord]) -> ColumnarBatch:
        """Validate and decode raw records into one columnar batch; a record
        that fails becomes a rejected row with its reason code (counted once,
        here).  Texts are tokenized in one batched call and media decoded on
        ``decode_threads`` threads."""
        t0 = time.perf_counter()
        items = raws if isinstance(raws, Sequence) else list(raws)
        builder = self.pre.builder(len(items))
        for pos, (raw, item) in enumerate(zip(items, self.pre.prepare_many(items, self._decode_pool()), strict=True)):
            if isinstance(item, Prepared):
                builder.add(item, pos)
            else:
                rid, code, message = self._decode_failure(raw, item)
                builder.reject(pos, rid, code.value, message)
        batch = builder.build()
        self._count_rejections(batch.rejected.codes, batch.rejected.ids)
        self._stage_pre.observe(time.perf_counter() - t0)
        return batch

    def prepare(self, raw: RawRecord) -> Prepared | Result:
        """Decode one record, or return its error Result."""
        item = self._decode_one(raw)
        if isinstance(item, Prepared):
            return item
        rid, code, message = item
        return self.error_result(rid, code, message)

    # -- infer ---------------------------------------------------------------------
    def infer_batch(self, batch: ColumnarBatch) -> ResultBatch:
        """Results of a decoded batch: the engine in chunks of
        ``batch_size``, a record that breaks the engine isolated, vectorised
        postprocessing; rejected records answered in place."""
        if self.engine is None:
            raise RuntimeError("this Predictor was built without an engine (decode only)")
        parts = [self._infer_chunk(chunk) for chunk in batch.chunks(self.batch_size)]
        if not parts:
            parts = [self._infer_chunk(batch.take(slice(0, 0)))]
        return ResultBatch.concat(parts, size=batch.size, rejected=batch.rejected)

    def _infer_chunk(self, chunk: ColumnarBatch) -> ResultBatch:
        assert self.engine is not None
        engine = self.engine
        t0 = time.perf_counter()

        def run(rows: list[int]) -> dict[str, np.ndarray]:
            part = chunk if len(rows) == len(chunk) else chunk.take(rows)
            return engine.run(self.pre.feeds(part))

        def failed(exc: BaseException, rows: int) -> None:
            event = "engine_unavailable" if isinstance(exc, EngineUnavailable) else "engine_failed"
            log_event(logger, logging.ERROR, event, exc_type=type(exc).__name__, batch=rows)

        groups = run_isolated(run, len(chunk), failed) if len(chunk) else []
        t1 = time.perf_counter()
        ok_rows: list[int] = []
        outs: list[dict[str, np.ndarray]] = []
        rejected = Rejected()
        for rows, got in groups:
            if isinstance(got, str):
                message = ("the engine is unavailable" if got == Isolated.UNAVAILABLE
                           else "the engine failed on this record")
                for r in rows:
                    rejected.add(int(chunk.positions[r]), chunk.ids[r], Reason.INFERENCE_FAILED.value, message)
            else:
                ok_rows += rows
                outs.append(got)
        self._count_rejections(rejected.codes, rejected.ids)
        good = chunk if len(ok_rows) == len(chunk) else chunk.take(ok_rows)
        if len(outs) > 1:  # rows answered one by one after a failure: stack their outputs
            merged = {k: pad_concat([o[k] for o in outs], tuple(range(1, outs[0][k].ndim))) for k in outs[0]}
        else:
            merged = outs[0] if outs else {}
        heads = [
            head_columns(h, merged[self._outputs.get(h.name, h.name)] if merged else _no_rows(h),
                         good.offsets if h.type == "token" else None, good.lengths)
            for h in self.spec.heads
        ]
        t2 = time.perf_counter()
        n = len(good)
        result = ResultBatch(
            self.spec.name, self.package.name, self.package.version, engine.name, engine.provider,
            good.ids, good.positions, heads,
            {"preprocess": good.preprocess_ms, "infer": np.full(n, (t1 - t0) * 1e3, dtype=np.float64),
             "postprocess": np.full(n, (t2 - t1) * 1e3, dtype=np.float64)},
            rejected, size=chunk.size,
        )
        if n:
            self._batch_size.observe(n)
            self._stage_infer.observe(t1 - t0)
            self._stage_post.observe(t2 - t1)
            self._records_ok.inc(n)
        return result

    def infer(self, prepared: Sequence[Prepared]) -> list[Result]:
        """Results of already decoded records, in order (the typed API)."""
        return self.infer_batch(self.pre.columns(prepared)).to_results()

    # -- the whole thing -------------------------------------------------------
    def predict_batch(self, raws: Iterable[RawRecord]) -> ResultBatch:
        """Raw records in, a :class:`ResultBatch` out (input order, errors in
        place).  More records than ``batch_size`` are decoded one chunk
        ahead: chunk k+1 decodes while the engine runs chunk k."""
        t0 = time.perf_counter()
        items = raws if isinstance(raws, Sequence) else list(raws)
        n, size = len(items), max(1, self.batch_size)
        if n <= size or self.decode_threads <= 1:
            out = self.infer_batch(self.decode(items))
        else:
            if self._ahead is None:
                self._ahead = ThreadPoolExecutor(1, thread_name_prefix="mmpipe-decode-ahead")
            starts = list(range(0, n, size))
            pending = self._ahead.submit(self.decode, items[0:size])
            parts = []
            for k in range(len(starts)):
                batch = pending.result()
                if k + 1 < len(starts):
                    pending = self._ahead.submit(self.decode, items[starts[k + 1] : starts[k + 1] + size])
                parts.append(self.infer_batch(batch))
            out = ResultBatch.merge(parts)
        self._request.observe(time.perf_counter() - t0)
        return out

    def predict(self, raws: Iterable[RawRecord]) -> list[Result]:
        """Results in input order; errors in place of records that failed."""
        return self.predict_batch(raws).to_results()

    def close(self) -> None:
        for pool in (self._ahead, self._pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()
