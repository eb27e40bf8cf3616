"""The two Ray Data stages: decode (CPU tasks) and infer (an actor pool).

Both are thin: decoding is ``Predictor.prepare`` and inference is
``Predictor.infer``, exactly what every other path runs, so a record gets the
same result here as anywhere.  What lives here is only the hand-over between
them: a ``Prepared`` record crosses the task boundary as plain numpy columns
(fixed-shape tensors; text padded to the workload's max length plus its
token count), which Ray Data stores as Arrow tensor columns in its object
store.  No custom object is pickled.

Every shard ends with one ``end`` row carrying its record count, so the
driver can tell when all of a shard's rows have arrived (rows of one shard
may be spread over many inference batches, in any order).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.batch.inputs import Shard, open_filesystem, read_shard
from pipeline.config import Settings
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.preprocess import Prepared
from pipeline.records import Result

EMIT_ROWS = 64  # decoded records per output block: small blocks keep memory flat

LABEL_TYPE = pa.list_(pa.struct([("head", pa.string()), ("label", pa.string()), ("score", pa.float64())]))

OUT_SCHEMA = pa.schema([
    ("shard", pa.string()), ("seq", pa.int64()), ("kind", pa.string()), ("id", pa.string()),
    ("error_code", pa.string()), ("error_message", pa.string()), ("source", pa.string()),
    ("position", pa.int64()), ("count", pa.int64()), ("decode_s", pa.float64()), ("infer_s", pa.float64()),
    ("model", pa.string()), ("model_version", pa.string()), ("engine", pa.string()), ("provider", pa.string()),
    ("labels", LABEL_TYPE), ("result", pa.string()),
    ("preprocess_ms", pa.float64()), ("infer_ms", pa.float64()), ("postprocess_ms", pa.float64()),
])


@lru_cache(maxsize=4)
def _decoder(settings_json: str, package_dir: str) -> Predictor:
    """A decode-only Predictor per worker process: Ray reuses workers across
    tasks, so the package (checksums, tokenizer) is loaded once per process."""
    settings = Settings.model_validate_json(settings_json)
    return Predictor(load_package(package_dir), None, limits=settings.limits, media=settings.media, path="batch")


class _Columns:
    """Decoded rows of one output block, as the numpy columns of a batch."""

    def __init__(self, predictor: Predictor) -> None:
        self.prep = predictor.spec.preprocessing
        self.modalities = predictor.spec.modalities
        self.max_len = self.prep.text.max_length if self.prep.text is not None else 0
        self.rows: list[dict[str, Any]] = []

    def add(self, shard: str, seq: int, kind: str, *, rid: str = "", code: str = "", message: str = "",
            source: str = "", position: int = -1, count: int = 0, decode_s: float = 0.0,
            prepared: Prepared | None = None) -> None:
        self.rows.append({"shard": shard, "seq": seq, "kind": kind, "id": rid, "error_code": code,
                          "error_message": message, "source": source, "position": position, "count": count,
                          "decode_s": decode_s, "prepared": prepared})

    def __len__(self) -> int:
        return len(self.rows)

    def take(self) -> dict[str, np.ndarray]:
        rows, self.rows = self.rows, []
        n = len(rows)
        out: dict[str, np.ndarray] = {
            k: np.array([r[k] for r in rows], dtype=object)
            for k in ("shard", "kind", "id", "error_code", "error_message", "source")
        }
        out["seq"] = np.array([r["seq"] for r in rows], dtype=np.int64)
        out["position"] = np.array([r["position"] for r in rows], dtype=np.int64)
        out["count"] = np.array([r["count"] for r in rows], dtype=np.int64)
        out["decode_s"] = np.array([r["decode_s"] for r in rows], dtype=np.float64)
        preps: list[Prepared | None] = [r["prepared"] for r in rows]
        out["preprocess_ms"] = np.array([p.preprocess_ms if p else 0.0 for p in preps], dtype=np.float64)
        out["present"] = np.array(
            [[1.0 if p and p.present.get(m) else 0.0 for m in self.modalities] for p in preps], dtype=np.float32
        ).reshape(n, len(self.modalities))
        prep = self.prep
        if prep.text is not None:
            ids = np.zeros((n, self.max_len), dtype=np.int64)
            offs = np.zeros((n, self.max_len, 2), dtype=np.int32)
            ntok = np.zeros(n, dtype=np.int64)
            for i, p in enumerate(preps):
                if p is not None:
                    t = p.features["input_ids"]
                    ids[i, : len(t)], ntok[i] = t, len(t)
                    if p.offsets:
                        offs[i, : len(p.offsets)] = p.offsets
            out["input_ids"], out["offsets"], out["n_tokens"] = ids, offs, ntok
        shapes: dict[str, tuple[int, ...]] = {}
        if prep.image is not None:
            shapes["pixel_values"] = (prep.image.channels, prep.image.size, prep.image.size)
        if prep.audio is not None:
            shapes["audio_features"] = (prep.audio.n_mels, prep.audio.frames)
        if prep.tabular is not None:
            shapes["tabular"] = (len(prep.tabular.fields),)
        for key, shape in shapes.items():
            arr = np.zeros((n, *shape), dtype=np.float32)
            for i, p in enumerate(preps):
                if p is not None and key in p.features:
                    arr[i] = p.features[key]
            out[key] = arr
        return out


def decode_shards(
    batch: dict[str, np.ndarray], *, settings_json: str, package_dir: str, input_uri: str
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches function (a CPU task): shards in, decoded records
    out.  A record that fails to decode becomes an ``error`` row with its
    reason code; it never fails the task."""
    predictor = _decoder(settings_json, package_dir)
    settings = Settings.model_validate_json(settings_json)
    fs, _ = open_filesystem(input_uri, settings.batch.filesystem)
    cols = _Columns(predictor)
    workload = predictor.spec.name
    for i in range(len(batch["key"])):
        shard = Shard(key=str(batch["key"][i]), kind=str(batch["kind"][i]), path=str(batch["path"][i]),  # type: ignore[arg-type]
                      start=int(batch["start"][i]), end=int(batch["end"][i]), files=str(batch["files"][i]))
        t0 = time.perf_counter()
        seq = 0
        source = shard.path
        for position, raw in read_shard(fs, shard, workload, predictor.pre.limits):
            item = predictor.prepare(raw)
            if isinstance(item, Result):
                assert item.error is not None
                cols.add(shard.key, seq, "error", rid=item.id, code=item.error.code, message=item.error.message,
                         source=source, position=position)
            else:
                cols.add(shard.key, seq, "ok", rid=item.id, source=source, position=position, prepared=item)
            seq += 1
            if len(cols) >= EMIT_ROWS:
                yield cols.take()
        cols.add(shard.key, -1, "end", source=source, count=seq, decode_s=time.perf_counter() - t0)
    if len(cols):
        yield cols.take()


class InferActor:
    """Ray Data callable class: one loaded model per actor for the whole job
    (ONNX Runtime session or a Triton client), fed batches of decoded rows."""

    def __init__(self, settings_json: str, package_dir: str, batch_size: int) -> None:
        settings = Settings.model_validate_json(settings_json)
        self.predictor = Predictor.from_settings(settings, package_dir, path="batch")
        self.predictor.batch_size = batch_size
        self.spec = self.predictor.spec
        self.modalities = self.spec.modalities

    def _prepared(self, batch: dict[str, np.ndarray], i: int) -> Prepared:
        present = {m: bool(batch["present"][i][j]) for j, m in enumerate(self.modalities)}
        feats: dict[str, np.ndarray] = {}
        offsets: list[tuple[int, int]] = []
        if "input_ids" in batch:
            n = int(batch["n_tokens"][i])
            feats["input_ids"] = np.asarray(batch["input_ids"][i][:n], dtype=np.int64)
            offsets = [(int(a), int(b)) for a, b in batch["offsets"][i][:n]]
        for key, modality in (("pixel_values", "image"), ("audio_features", "audio"), ("tabular", "tabular")):
            if key in batch and present.get(modality):
                feats[key] = np.asarray(batch[key][i], dtype=np.float32)
        return Prepared(id=str(batch["id"][i]), workload=self.spec.name, features=feats, present=present,
                        offsets=offsets, preprocess_ms=float(batch["preprocess_ms"][i]))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        t0 = time.perf_counter()
        kinds = [str(k) for k in batch["kind"]]
        ok = [i for i, k in enumerate(kinds) if k == "ok"]
        results = dict(zip(ok, self.predictor.infer([self._prepared(batch, i) for i in ok]), strict=True))
        n = len(kinds)
        share = (time.perf_counter() - t0) / max(n, 1)
        pkg, eng = self.predictor.package, self.predictor.engine
        assert eng is not None
        cols: dict[str, list[Any]] = {f.name: [] for f in OUT_SCHEMA}
        for i in range(n):
            res = results.get(i)
            kind, code, message = kinds[i], str(batch["error_code"][i]), str(batch["error_message"][i])
            if res is not None and res.error is not None:  # the engine failed on this record
                kind, code, message = "error", res.error.code, res.error.message
            cols["kind"].append(kind)
            cols["error_code"].append(code or None)
            cols["error_message"].append(message or None)
            cols["labels"].append(_labels(res) if res is not None and res.error is None else None)
            cols["result"].append(res.model_dump_json(exclude_none=True) if res is not None and res.error is None
                                  else None)
            timings = res.timings_ms if res is not None else {}
            for stage in ("preprocess", "infer", "postprocess"):
                cols[f"{stage}_ms"].append(timings.get(stage))
            cols["infer_s"].append(share)
        for key in ("shard", "id", "source"):
            cols[key] = [str(x) for x in batch[key]]
        for key in ("seq", "position", "count"):
            cols[key] = [int(x) for x in batch[key]]
        cols["decode_s"] = [float(x) for x in batch["decode_s"]]
        cols["model"] = [pkg.name] * n
        cols["model_version"] = [pkg.version] * n
        cols["engine"] = [eng.name] * n
        cols["provider"] = [eng.provider] * n
        return pa.Table.from_pydict(cols, schema=OUT_SCHEMA)


def _labels(res: Result) -> list[dict[str, Any]]:
    """The predicted labels as flat rows: the top class of a multiclass head,
    every label over threshold of a multilabel head, every span of a token
    head.  This is what label counts count."""
    out: list[dict[str, Any]] = []
    for name, head in (res.heads or {}).items():
        if head.type == "token":
            out += [{"head": name, "label": s.label, "score": s.score} for s in head.spans or []]
        elif head.type == "multiclass":
            out += [{"head": name, "label": ls.label, "score": ls.score} for ls in head.labels[:1]]
        else:
            out += [{"head": name, "label": ls.label, "score": ls.score} for ls in head.labels]
    return out


def settings_json(settings: Settings) -> str:
    """Settings as JSON for the stages' constructors (plain data across processes)."""
    return json.dumps(settings.model_dump(mode="json"))
