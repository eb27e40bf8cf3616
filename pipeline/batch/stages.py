"""The two Ray Data stages: decode (CPU tasks) and infer-and-write (an actor pool).

Both work on the columnar batch end to end.  A decode task reads one shard,
runs ``Predictor.decode`` over it (a :class:`~pipeline.columnar.ColumnarBatch`)
and emits it as **one** block (``ColumnarBatch.to_block``: numpy columns, one
row per input record, rejected records as rows with their reason code) plus
the shard's bookkeeping columns.  An inference actor rebuilds the batch with
``ColumnarBatch.from_block``, runs ``Predictor.infer_batch`` and writes the
rows as a Parquet file into the output table itself; what goes back to the
driver is one small row per file written (counts, label counts, where it
ran).  No per-record Python object crosses a process boundary, and no result
row travels to the driver.

Ray Data may split a large block; a piece is written as its own file and the
driver counts a shard done once pieces covering all its records are in.
Each worker process opens its settings, package (trusting the digest the
driver verified) and filesystems once, and pushes its own metrics.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry

from pipeline.batch.inputs import Shard, open_filesystem, read_shard
from pipeline.batch.output import file_schema
from pipeline.batch.pushgateway import push_worker_metrics
from pipeline.columnar import ColumnarBatch
from pipeline.config import Settings
from pipeline.engines import create_engine
from pipeline.generate import Generator, add_generated, generator_for
from pipeline.metrics import get_metrics
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.results import ResultBatch

EMPTY = "_empty"
"""error_code of the one placeholder row of a shard without records (dropped by the actor)."""

PIECE_FIELDS = ("shard", "first_seq", "last_seq", "rows", "total", "ok", "errors", "labels", "name", "size",
                "decode_s", "infer_s", "decode_node", "infer_node", "engine")


def _node() -> str:
    try:
        import ray

        if ray.is_initialized():  # asking an uninitialised Ray for its context would start one
            return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (unit tests)
        pass
    return socket.gethostname()


def _worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class _Worker:
    """What a worker process opens once: settings, the package (trusting
    the driver's digest), a Predictor recording into the process's own
    registry, and the metric push."""

    def __init__(self, settings_json: str, package_dir: str, digest: str, *, engine: bool) -> None:
        self.settings = Settings.model_validate_json(settings_json)
        package = load_package(package_dir, trusted_digest=digest)
        self.registry = CollectorRegistry()
        eng = None
        self.generator: Generator | None = None
        if engine:
            cfg = self.settings.engine.model_copy()
            if not cfg.threads:  # ONNX Runtime's threads match the CPUs this actor holds
                cfg.threads = max(1, int(self.settings.batch.actor_num_cpus))
            eng = create_engine(package, cfg)
            # generate.enabled: the generative head beside the tagging heads (off: nothing loaded)
            self.generator = generator_for(package, self.settings, cfg)
        b = self.settings.batch
        threads = b.decode_threads or max(1, int(b.actor_num_cpus if engine else b.num_cpus))
        self.predictor = Predictor(package, eng, limits=self.settings.limits, media=self.settings.media,
                                   batch_size=b.batch_size, path="batch", metrics=get_metrics(self.registry),
                                   decode_threads=threads)
        self.node = _node()
        self.worker = _worker_id()

    def push_metrics(self) -> None:
        cfg = self.settings.batch
        if cfg.pushgateway_url:
            push_worker_metrics(cfg.pushgateway_url, cfg.pushgateway_job, self.predictor.spec.name, self.registry,
                                self.worker)


@lru_cache(maxsize=4)
def _decode_worker(settings_json: str, package_dir: str, digest: str) -> _Worker:
    return _Worker(settings_json, package_dir, digest, engine=False)


@lru_cache(maxsize=8)
def _filesystem(uri: str, options_json: str) -> tuple[Any, str]:
    return open_filesystem(uri, json.loads(options_json))


def _shard(batch: dict[str, np.ndarray], i: int) -> Shard:
    return Shard(key=str(batch["key"][i]), kind=str(batch["kind"][i]), path=str(batch["path"][i]),  # type: ignore[arg-type]
                 start=int(batch["start"][i]), end=int(batch["end"][i]), files=str(batch["files"][i]))


def decode_shard(w: _Worker, fs: Any, shard: Shard) -> tuple[ColumnarBatch, dict[str, np.ndarray]]:
    """One shard read and decoded: its batch and bookkeeping columns (one row
    per input record: id, shard, source, seq, position, total, decode time
    and node).  A record that fails to decode is a rejected row with its
    reason code; it never fails the shard.  A shard without records becomes
    one placeholder row (error code ``EMPTY``) so its completion is counted."""
    pred = w.predictor
    t0 = time.perf_counter()
    positions: list[int] = []

    def raws() -> Iterator[Any]:
        for position, raw in read_shard(fs, shard, pred.spec.name, pred.pre.limits):
            positions.append(position)
            yield raw

    cb = pred.decode(raws())
    total = cb.size
    if total == 0:
        b = pred.pre.builder(1)
        b.reject(0, "", EMPTY, "")
        cb, positions = b.build(), [-1]
    n = cb.size
    meta = {
        "id": cb.row_ids(), "shard": np.full(n, shard.key, dtype=object),
        "source": np.full(n, shard.path, dtype=object),
        "seq": np.arange(n, dtype=np.int64) if total else np.full(n, -1, dtype=np.int64),
        "position": np.asarray(positions, dtype=np.int64), "total": np.full(n, total, dtype=np.int64),
        "decode_s": np.full(n, time.perf_counter() - t0), "decode_node": np.full(n, w.node, dtype=object),
    }
    return cb, meta


def decode_shards(
    batch: dict[str, np.ndarray], *, settings_json: str, package_dir: str, digest: str, input_uri: str
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches function (a CPU task, ``batch.decode_in: tasks``):
    shards in, one decoded block per shard out."""
    w = _decode_worker(settings_json, package_dir, digest)
    fs, _ = _filesystem(input_uri, json.dumps(w.settings.batch.filesystem, sort_keys=True))
    text = w.predictor.spec.preprocessing.text
    for i in range(len(batch["key"])):
        cb, meta = decode_shard(w, fs, _shard(batch, i))
        yield {**cb.to_block(text.max_length if text is not None else None, messages=w.settings.generate.enabled),
               **meta}
    w.push_metrics()


_OBJECT_FIELDS = ("shard", "errors", "labels", "name", "decode_node", "infer_node", "engine")


def _pieces_block(pieces: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """What goes back to the driver: one small row per file written."""
    return {f: np.asarray([p[f] for p in pieces], dtype=object if f in _OBJECT_FIELDS else None)
            for f in PIECE_FIELDS}


class InferActor:
    """Ray Data callable class: one loaded model per actor for the whole
    job; each call infers the rows it is given and writes them to the output
    table's directory as Parquet."""

    def __init__(self, settings_json: str, package_dir: str, digest: str, out_dir: str, out_uri: str) -> None:
        self.w = _Worker(settings_json, package_dir, digest, engine=True)
        self.pred = self.w.predictor
        self.fs, _ = _filesystem(out_uri, json.dumps(self.w.settings.batch.output_options(), sort_keys=True))
        self.out_dir = out_dir
        spec = self.pred.spec
        self.block_args = {"workload": spec.name, "modalities": self.pred.pre.modalities,
                           "pad_id": self.pred.pre.text.pad_id if self.pred.pre.text is not None else 0,
                           "fixed_length": self.pred.pre.fixed_length}

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = np.asarray(block["shard"], dtype=object)
        pieces = []
        for key in dict.fromkeys(keys.tolist()):
            sel = np.flatnonzero(keys == key)
            part = {k: np.asarray(v)[sel] for k, v in block.items()}
            pieces.append(self.write(ColumnarBatch.from_block(part, **self.block_args), part))
        self.w.push_metrics()
        return _pieces_block(pieces)

    def write(self, cb: ColumnarBatch, part: dict[str, np.ndarray]) -> dict[str, Any]:
        """Infer one shard's rows (``part``: their bookkeeping columns) and
        write them as one Parquet file; returns the piece the driver tracks."""
        key, total = str(part["shard"][0]), int(part["total"][0])
        piece = {"shard": key, "total": total, "decode_s": float(part["decode_s"][0]),
                 "decode_node": str(part["decode_node"][0]), "infer_node": self.w.node,
                 "engine": f"{self.pred.engine.name} ({self.pred.engine.provider})" if self.pred.engine else ""}
        if total == 0:
            return {**piece, "first_seq": -1, "last_seq": -1, "rows": 0, "ok": 0, "errors": "{}", "labels": "{}",
                    "name": "", "size": 0, "infer_s": 0.0}
        t0 = time.perf_counter()
        res = self.pred.infer_batch(cb)
        if self.w.generator is not None:
            res = add_generated(self.w.generator, cb, res)
        tbl, label_counts = result_table(res, part)
        name = f"part-{key}-{int(part['seq'][0]):07d}-{uuid.uuid4().hex[:8]}.parquet"
        path = f"{self.out_dir}/{name}"
        pq.write_table(tbl, path, filesystem=self.fs, compression="zstd")
        size = self.fs.get_file_info(path).size
        return {**piece, "first_seq": int(part["seq"][0]), "last_seq": int(part["seq"][-1]), "rows": tbl.num_rows,
                "ok": res.ok_count, "errors": json.dumps(Counter(res.rejected.codes)),
                "labels": json.dumps(label_counts), "name": name, "size": int(size),
                "infer_s": time.perf_counter() - t0}


class ShardActor(InferActor):
    """Ray Data callable class for ``batch.decode_in: actor``: each actor
    reads, decodes, infers and writes whole shards, so a decoded batch never
    leaves the process that made it (no block through the object store, no
    rebuild) and every CPU runs the same loop.  The default on CPU-only
    clusters; GPU actors keep decoding in separate CPU tasks instead."""

    def __init__(self, settings_json: str, package_dir: str, digest: str, out_dir: str, out_uri: str,
                 input_uri: str) -> None:
        super().__init__(settings_json, package_dir, digest, out_dir, out_uri)
        self.in_fs, _ = _filesystem(input_uri, json.dumps(self.w.settings.batch.filesystem, sort_keys=True))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
        pieces = [self.write(*decode_shard(self.w, self.in_fs, _shard(batch, i))) for i in range(len(batch["key"]))]
        self.w.push_metrics()
        return _pieces_block(pieces)


# -- result rows as Arrow columns ------------------------------------------------------------------------------
def result_table(res: ResultBatch, part: dict[str, np.ndarray]) -> tuple[pa.Table, dict[str, dict[str, int]]]:
    """One row per input record of ``part`` (results and rejected records
    in input order), built column by column; and the label counts."""
    n = res.size
    code = np.full(n, None, dtype=object)
    msg = np.full(n, None, dtype=object)
    code[res.rejected.positions] = res.rejected.codes
    msg[res.rejected.positions] = res.rejected.messages
    labels, counts = label_column(res)
    timings = {}
    for stage in ("preprocess", "infer", "postprocess"):
        col = np.full(n, np.nan)
        col[res.positions] = res.timings[stage]
        timings[f"{stage}_ms"] = pa.array(col, pa.float64(), mask=np.isnan(col))
    const = {"model": res.model, "model_version": res.model_version, "engine": res.engine, "provider": res.provider}
    generated = generated_columns(res)
    cols = {
        "id": pa.array(part["id"], pa.string()), "error_code": pa.array(code, pa.string()),
        "error_message": pa.array(msg, pa.string()), "source": pa.array(part["source"], pa.string()),
        "position": pa.array(part["position"], pa.int64()),
        **{k: pa.array(np.full(n, v, dtype=object), pa.string()) for k, v in const.items()},
        "labels": labels,
        "result": pa.array(res.json_lines(), pa.binary()).cast(pa.string()),
        **timings,
        **generated,
    }
    return pa.table(cols, schema=file_schema(bool(generated))), counts


def generated_columns(res: ResultBatch) -> dict[str, pa.Array]:
    """``generated_text`` and ``generated_finish_reason`` of every row (null
    for rejected records and for records the head could not answer); none
    when the run does not generate."""
    if res.generated is None:
        return {}
    text = np.full(res.size, None, dtype=object)
    finish = np.full(res.size, None, dtype=object)
    text[res.positions] = [g["text"] for g in res.generated]
    finish[res.positions] = [g["finish_reason"] for g in res.generated]
    return {"generated_text": pa.array(text, pa.string()), "generated_finish_reason": pa.array(finish, pa.string())}


def label_column(res: ResultBatch) -> tuple[pa.Array, dict[str, dict[str, int]]]:
    """The predicted labels of every row as a list<struct<head, label,
    score>> column (the top class of a multiclass head, every label over
    threshold of a multilabel head, every span of a token head; null for a
    rejected record), built from the heads' columns without per-label
    objects; and how often each label was predicted."""
    n = res.size
    rows, heads, names, scores = [], [], [], []
    counts: dict[str, dict[str, int]] = {}
    for h in res.heads:
        spec = h.spec
        if spec.type == "token":
            spans = h.spans or []
            per = np.fromiter(map(len, spans), dtype=np.int64, count=len(spans))
            lab = np.asarray([s[2] for s in chain.from_iterable(spans)], dtype=object)
            sc = np.asarray([s[3] for s in chain.from_iterable(spans)], dtype=np.float64)
        else:
            picked = (h.picked or []) if spec.type == "multilabel" else [p[:1] for p in h.picked or []]
            per = np.fromiter(map(len, picked), dtype=np.int64, count=len(picked))
            flat = np.fromiter(chain.from_iterable(picked), dtype=np.int64, count=int(per.sum()))
            r = np.repeat(np.arange(len(picked)), per)
            lab = np.asarray(spec.labels, dtype=object)[flat] if len(flat) else np.zeros(0, dtype=object)
            sc = h.probs[r, flat].astype(np.float64) if h.probs is not None and len(flat) else np.zeros(0)
        rows.append(np.repeat(res.positions, per))
        heads.append(np.full(len(lab), spec.name, dtype=object))
        names.append(lab)
        scores.append(sc)
        uniq, cnt = np.unique(lab.astype(str), return_counts=True) if len(lab) else ([], [])
        counts[spec.name] = {str(u): int(c) for u, c in zip(uniq, cnt, strict=True)}
    row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    order = np.argsort(row, kind="stable")  # heads in spec order within a row
    offsets = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n))]).astype(np.int32)
    values = pa.StructArray.from_arrays(
        [pa.array(np.concatenate(heads)[order] if heads else [], pa.string()),
         pa.array(np.concatenate(names)[order] if names else [], pa.string()),
         pa.array(np.concatenate(scores)[order] if scores else [], pa.float64())],
        names=["head", "label", "score"])
    rejected = np.zeros(n, dtype=bool)
    rejected[res.rejected.positions] = True
    arr = pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(rejected))
    return arr.cast(file_schema(False).field("labels").type), counts


def settings_json(settings: Settings) -> str:
    """Settings as JSON for the stages' constructors (plain data across processes)."""
    return json.dumps(settings.model_dump(mode="json"))
