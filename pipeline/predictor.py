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
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.config import Limits, MediaConfig, Settings
from pipeline.engines import Engine, EngineUnavailable, create_engine
from pipeline.errors import PackageError, Reason, RecordError
from pipeline.log import log_event, safe_id
from pipeline.metrics import Metrics, get_metrics
from pipeline.package import ModelPackage, load_package
from pipeline.postprocess import head_result
from pipeline.preprocess import Prepared, Preprocessor
from pipeline.records import ErrorInfo, Record, Result

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
    ) -> None:
        self.package = package
        self.spec = package.spec
        self.engine = engine
        self.batch_size = batch_size
        self.path = path
        self.pre = Preprocessor.for_package(package, limits, media)
        self._outputs = package.manifest.signature.head_outputs()
        self.metrics = metrics or get_metrics()
        self._labels = {"path": path, "workload": self.spec.name, "model": package.name}
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
        self.metrics.records.labels(**self._labels, outcome="error").inc()
        self.metrics.errors.labels(**self._labels, reason=code.value).inc()
        log_event(
            logger, logging.DEBUG, "record_rejected", reason=code.value,
            record=safe_id(record_id, self.spec.privacy.hash_ids) if record_id else None,
            workload=self.spec.name, path=self.path,
        )
        return Result(
            id=record_id or "", workload=self.spec.name, model=self.package.name,
            model_version=self.package.version, engine=self.engine.name if self.engine else None,
            provider=self.engine.provider if self.engine else None, error=ErrorInfo(code=code.value, message=message),
        )

    # -- the two halves ----------------------------------------------------------
    def prepare(self, raw: RawRecord) -> Prepared | Result:
        """Decode one record, or return its error Result."""
        try:
            return self.pre.prepare(raw)
        except RecordError as err:
            return self.error_result(_guess_id(raw), err.code, err.message)
        except Exception as exc:  # a decoder bug must not take the batch down
            log_event(logger, logging.ERROR, "preprocess_bug", exc_type=type(exc).__name__)
            return self.error_result(
                _guess_id(raw), Reason.BAD_RECORD, f"record could not be processed ({type(exc).__name__})"
            )

    def infer(self, prepared: Sequence[Prepared]) -> list[Result]:
        """Run prepared records through the engine in chunks of ``batch_size``."""
        if self.engine is None:
            raise RuntimeError("this Predictor was built without an engine (decode only)")
        results: list[Result] = []
        for start in range(0, len(prepared), self.batch_size):
            results.extend(self._infer_chunk(list(prepared[start : start + self.batch_size])))
        return results

    def _run_engine(self, chunk: list[Prepared]) -> dict[str, np.ndarray]:
        assert self.engine is not None  # infer() refuses a decode-only Predictor
        feeds = self.pre.collate(chunk)
        return self.engine.run(feeds)

    def _infer_chunk(self, chunk: list[Prepared]) -> list[Result]:
        if not chunk:
            return []
        t0 = time.perf_counter()
        try:
            outputs: dict[str, np.ndarray] | None = self._run_engine(chunk)
        except EngineUnavailable as exc:
            log_event(logger, logging.ERROR, "engine_unavailable", exc_type=type(exc).__name__, batch=len(chunk))
            return [self.error_result(p.id, Reason.INFERENCE_FAILED, "the engine is unavailable") for p in chunk]
        except Exception as exc:
            log_event(logger, logging.ERROR, "engine_failed", exc_type=type(exc).__name__, batch=len(chunk))
            outputs = None
        if outputs is None:
            # Isolate the record that breaks the engine; the others still answer.
            if len(chunk) == 1:
                return [self.error_result(chunk[0].id, Reason.INFERENCE_FAILED, "the engine failed on this record")]
            return [r for p in chunk for r in self._infer_chunk([p])]
        t1 = time.perf_counter()
        results = []
        for i, p in enumerate(chunk):
            heads = {
                h.name: head_result(h, outputs[self._outputs.get(h.name, h.name)][i],
                                    p.offsets if h.type == "token" else None)
                for h in self.spec.heads
            }
            results.append(
                Result(
                    id=p.id, workload=p.workload, model=self.package.name, model_version=self.package.version,
                    engine=self.engine.name, provider=self.engine.provider, heads=heads,
                    timings_ms={"preprocess": round(p.preprocess_ms, 3), "infer": round((t1 - t0) * 1e3, 3)},
                )
            )
        t2 = time.perf_counter()
        for r in results:
            r.timings_ms["postprocess"] = round((t2 - t1) * 1e3, 3)
        m, lab = self.metrics, self._labels
        m.batch_size.labels(**lab).observe(len(chunk))
        m.stage_seconds.labels(**lab, stage="infer").observe(t1 - t0)
        m.stage_seconds.labels(**lab, stage="postprocess").observe(t2 - t1)
        m.records.labels(**lab, outcome="ok").inc(len(chunk))
        return results

    # -- the whole thing -------------------------------------------------------
    def predict(self, raws: Iterable[RawRecord]) -> list[Result]:
        """Results in input order; errors in place of records that failed."""
        t0 = time.perf_counter()
        slots: list[Result | None] = []
        ok: list[tuple[int, Prepared]] = []
        for raw in raws:
            item = self.prepare(raw)
            if isinstance(item, Result):
                slots.append(item)
            else:
                ok.append((len(slots), item))
                slots.append(None)
        t1 = time.perf_counter()
        self.metrics.stage_seconds.labels(**self._labels, stage="preprocess").observe(t1 - t0)
        for (idx, _), res in zip(ok, self.infer([p for _, p in ok]), strict=True):
            slots[idx] = res
        self.metrics.request_seconds.labels(**self._labels).observe(time.perf_counter() - t0)
        return [s for s in slots if s is not None]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
