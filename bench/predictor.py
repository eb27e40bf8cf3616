"""The Predictor on raw records vs the engine on the same records' ready tensors.

What the Predictor costs on top of the engine it wraps: for each model and
batch size, one run measures, on the same records,

* ``engine``: ``engine.run`` over every batch's ready feeds (decoded,
  collated beforehand, not timed);
* ``predictor``: ``Predictor.predict_batch`` on the raw JSON records (parse,
  validate, decode, tokenize, collate, engine, postprocess) plus the
  results' wire form (``ResultBatch.json_lines``), what a path ships;

rounds interleaved, medians kept, and a per-stage breakdown of the
Predictor's work measured on one thread (parse, decode per modality,
tokenize, collate, engine, postprocess, serialise).  Two models: the demo's
small retail model and the production-sized one (bench/models.py).

    python bench/predictor.py                          # both models
    python bench/predictor.py --models small --records 1024

Writes bench/results/predictor.json (with its "aims") and predictor.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench.machine import cpu_flags, model_axes  # noqa: E402
from bench.models import MODELS  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.metrics import get_metrics  # noqa: E402
from pipeline.package import load_package  # noqa: E402
from pipeline.postprocess import head_columns  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.records import jsonl_line, parse_record, resolve_media  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402

OUT = ROOT / "bench" / "results"
AIMS = {"small": 0.5, "production": 0.9}
"""Predictor records/s over engine records/s at batch 64."""




def wire_records(workload: str, n: int) -> list[bytes]:
    """Sample records as the bytes every path receives (JSON, media base64)."""
    out = []
    for i, s in enumerate(sample_data.generate(workload, n, seed=21, missing_rate=0.0)):
        out.append(jsonl_line({**s.record, "id": f"rec-{i}"}))
    return out


def stage_breakdown(pred: Predictor, records: list[bytes], batch: int) -> dict[str, float]:
    """Milliseconds per record of each stage, on one thread."""
    pre = pred.pre
    t: dict[str, float] = {}
    s = time.perf_counter()
    recs = [parse_record(r, pre.limits) for r in records]
    t["parse"] = time.perf_counter() - s
    if pre.prep.text is not None:
        s = time.perf_counter()
        pre._encode(recs)
        t["tokenize"] = time.perf_counter() - s
    if pre.prep.image is not None:
        from pipeline.decode import decode_image

        s = time.perf_counter()
        for r in recs:
            if r.image:
                decode_image(resolve_media(r.image, "image", pre.limits, pre.media), pre.prep.image, pre.limits)
        t["decode_image"] = time.perf_counter() - s
    one = Predictor(pred.package, pred.engine, batch_size=batch, metrics=get_metrics(CollectorRegistry()),
                    decode_threads=1)
    prepared = [pre.prepare(r) for r in records]
    s = time.perf_counter()
    feeds = [pre.feeds(pre.columns(prepared[i : i + batch])) for i in range(0, len(prepared), batch)]
    t["collate"] = time.perf_counter() - s
    assert pred.engine is not None
    s = time.perf_counter()
    outs = [pred.engine.run(f) for f in feeds]
    t["engine"] = time.perf_counter() - s
    heads_out = pred.package.manifest.signature.head_outputs()
    s = time.perf_counter()
    for o in outs:
        for h in pred.spec.heads:
            head_columns(h, o[heads_out.get(h.name, h.name)])
    t["postprocess"] = time.perf_counter() - s
    results = [one.predict_batch(records[i : i + batch]) for i in range(0, len(records), batch)]
    s = time.perf_counter()
    for r in results:
        r.json_lines()
    t["serialise"] = time.perf_counter() - s
    return {k: v * 1e3 / len(records) for k, v in t.items()}


def bench_model(kind: str, batches: list[int], n: int, rounds: int) -> list[dict]:
    pkg = load_package(MODELS[kind]())
    engine = create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", variant="fp32"))
    records = wire_records("retail", n)
    rows = []
    for b in batches:
        pred = Predictor(pkg, engine, batch_size=b, metrics=get_metrics(CollectorRegistry()))
        feeds = [pred.pre.feeds(pred.decode(records[i : i + b])) for i in range(0, n, b)]
        for f in feeds[:3]:  # warm-up
            engine.run(f)
        pred.predict_batch(records[: 2 * b]).json_lines()
        eng_t, pred_t = [], []
        for _ in range(rounds):
            s = time.perf_counter()
            for f in feeds:
                engine.run(f)
            eng_t.append(time.perf_counter() - s)
            s = time.perf_counter()
            lines = pred.predict_batch(records).json_lines()
            pred_t.append(time.perf_counter() - s)
            assert len(lines) == n
        eng_rps, pred_rps = n / statistics.median(eng_t), n / statistics.median(pred_t)
        row = {"model": kind, "batch": b, "records": n, "engine_rps": eng_rps, "predictor_rps": pred_rps,
               "ratio": pred_rps / eng_rps, "stages_ms_per_record": stage_breakdown(pred, records[: min(n, 256)], b)}
        stages = json.dumps({k: round(v, 3) for k, v in row["stages_ms_per_record"].items()})
        print(f"{kind:10s} batch {b:3d}: engine {eng_rps:8.0f} rec/s  predictor {pred_rps:8.0f} rec/s  "
              f"ratio {row['ratio']:.2f}  stages ms/record {stages}", flush=True)
        rows.append(row)
    return rows


def chart(rows: list[dict], path: Path) -> None:
    fig, panels = model_axes(rows)
    for ax, m, sub in panels:
        x = np.arange(len(sub))
        ax.bar(x - 0.2, [r["engine_rps"] for r in sub], 0.4, label="engine (ready tensors)")
        ax.bar(x + 0.2, [r["predictor_rps"] for r in sub], 0.4, label="Predictor (raw records)")
        ax.set_xticks(x, [f"batch {r['batch']}\n{r['ratio']:.2f}x" for r in sub])
        ax.set_ylabel("records/s")
        ax.set_title(f"{m} model: Predictor vs engine")
        if AIMS.get(m):
            ax.axhline(0, color="none")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small", "production"], choices=sorted(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--records", type=int, default=512, help="records per measured round (small model)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    rows: list[dict] = []
    for kind in args.models:
        n = args.records if kind == "small" else max(64, args.records // 4)
        rows += bench_model(kind, args.batches, n, args.rounds)
    aims = []
    for kind in args.models:
        at64 = next((r for r in rows if r["model"] == kind and r["batch"] == 64), None)
        if at64 is not None:
            aims.append({"name": f"predictor/engine at batch 64, {kind} model", "value": round(at64["ratio"], 3),
                         "target": AIMS[kind], "met": at64["ratio"] >= AIMS[kind]})
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "predictor", "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
              "cores": len(__import__("os").sched_getaffinity(0)), "rows": rows, "aims": aims}
    (OUT / "predictor.json").write_text(json.dumps(result, indent=2) + "\n")
    chart(rows, OUT / "predictor.png")
    for a in aims:
        print(f"aim {a['name']}: {a['value']} (target >= {a['target']}) {'met' if a['met'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
