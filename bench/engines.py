"""PyTorch eager vs ONNX Runtime fp32 / fp16 / int8 on the same model and records.

Everything is measured side by side in one run, rounds interleaved across
engines, so the ratios hold on a shared, noisy machine.  Reports per batch
size: median latency, records/s, speed-up over eager, label agreement with
eager, and achieved GFLOP/s against a numpy sgemm measured in the same run
(how close the engine gets to this machine's matrix-multiply ceiling).

    python bench/engines.py                      # small default model + MiniLM model
    python bench/engines.py --models small --rounds 5

Writes bench/results/engines.json and bench/results/engines.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import model_axes  # noqa: E402
from exporters import parity  # noqa: E402
from exporters.onnx_export import export_package  # noqa: E402
from exporters.package import build_package  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.package import load_package  # noqa: E402
from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.spec import load_workload  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from pipeline.tooling.train import train  # noqa: E402

OUT = ROOT / "bench" / "results"


def numpy_sgemm_gflops(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> float:
    """Best fp32 matrix-multiply rate numpy reaches here: the ceiling."""
    best_rate = 0.0
    for n in sizes:
        a = np.random.default_rng(0).random((n, n), dtype=np.float32)
        b = np.random.default_rng(1).random((n, n), dtype=np.float32)
        a @ b
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best_rate


def model_flops(model, feeds: dict[str, np.ndarray]) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.run(feeds)
    return float(fc.get_total_flops())


def build(kind: str, work: Path) -> Path:
    """A trained, exported retail package: 'small' (default towers),
    'minilm' (pretrained 6-layer BERT-384 text tower) or 'production'
    (MiniLM + a ResNet-18-sized image tower at 224x224, bench/models.py)."""
    if kind == "production":
        import shutil

        from bench.models import production_package

        pkg = work / "pkg-production"
        shutil.copytree(production_package(), pkg)
        export_package(pkg, ("fp32", "fp16", "int8"))
        return pkg
    spec = load_workload("retail")
    samples = sample_data.generate("retail", 400, seed=0)
    text_source = "minilm" if kind == "minilm" else "builtin"
    train(spec, samples, work / f"trained-{kind}", text_source=text_source, max_steps=150 if kind == "minilm" else 300,
          progress=False, lr=1e-3 if kind == "minilm" else 2e-3)
    pkg = build_package(work / f"trained-{kind}", work / f"pkg-{kind}").root
    export_package(pkg, ("fp32", "fp16", "int8"))
    return pkg


def bench_model(kind: str, pkg_dir: Path, batches: list[int], rounds: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    pkg = load_package(pkg_dir)
    engines = {"eager": create_engine(pkg, EngineConfig(kind="torch", threads=threads))}
    for v in ("fp32", "fp16", "int8"):
        engines[f"ort-{v}"] = create_engine(
            pkg, EngineConfig(kind="onnxruntime", device="cpu", variant=v, threads=threads)
        )
    pre = Preprocessor(pkg.spec, pkg.text_encoder())
    recs = [pre.prepare(s.record) for s in sample_data.generate("retail", max(batches) * 4, seed=9, missing_rate=0.0)]
    flops_model = engines["eager"].model  # type: ignore[attr-defined]
    rows = []
    for b in batches:
        feeds_list = [pre.collate(recs[i * b : (i + 1) * b]) for i in range(4)]
        flops = model_flops(flops_model, feeds_list[0])
        ref = [engines["eager"].run(f) for f in feeds_list]
        times: dict[str, list[float]] = {k: [] for k in engines}
        for e in engines.values():  # warm-up
            e.run(feeds_list[0])
        for r in range(rounds):
            for name, e in engines.items():
                f = feeds_list[r % len(feeds_list)]
                t = time.perf_counter()
                e.run(f)
                times[name].append(time.perf_counter() - t)
        for name, e in engines.items():
            agree = total = 0
            for f, rf in zip(feeds_list, ref, strict=True):
                _, a, n = parity.compare(pkg.spec, rf, e.run(f), f.get("attention_mask"))
                agree, total = agree + a, total + n
            med = statistics.median(times[name])
            rows.append({
                "model": kind, "engine": name, "batch": b, "median_ms": med * 1e3,
                "records_per_s": b / med, "gflops": flops / med / 1e9, "agreement": agree / total,
            })
        base = next(r for r in rows if r["model"] == kind and r["batch"] == b and r["engine"] == "eager")
        for r in rows:
            if r["model"] == kind and r["batch"] == b:
                r["speedup_vs_eager"] = base["median_ms"] / r["median_ms"]
    return {"rows": rows, "params": sum(p.numel() for p in flops_model.parameters())}


ENGINE_AIMS = (("ort-fp32", 2.0), ("ort-int8", 3.0))
"""x eager at the largest batch, for the MiniLM-sized models (what an export must buy)."""


def engine_aims(rows: list[dict]) -> list[dict]:
    aims = []
    for model in ("minilm", "production"):
        sub = [r for r in rows if r["model"] == model]
        if not sub:
            continue
        top = max(r["batch"] for r in sub)
        for engine, target in ENGINE_AIMS:
            r = next(r for r in sub if r["engine"] == engine and r["batch"] == top)
            aims.append({"name": f"{engine} x eager, {model} model, batch {top}",
                         "value": round(r["speedup_vs_eager"], 3), "target": target,
                         "met": r["speedup_vs_eager"] >= target})
    return aims


def chart(rows: list[dict], path: Path) -> None:
    fig, panels = model_axes(rows)
    for ax, m, sub in panels:
        batches = sorted({r["batch"] for r in sub})
        engines = list(dict.fromkeys(r["engine"] for r in sub))
        width = 0.8 / len(engines)
        for i, e in enumerate(engines):
            ys = [next(r["speedup_vs_eager"] for r in sub if r["engine"] == e and r["batch"] == b) for b in batches]
            ax.bar(np.arange(len(batches)) + i * width, ys, width, label=e)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(np.arange(len(batches)) + width * (len(engines) - 1) / 2, [f"batch {b}" for b in batches])
        ax.set_ylabel("speed-up over PyTorch eager")
        ax.set_title(f"{m} model")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,minilm,production", help="comma list of small, minilm, production")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    result: dict = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
                    "numpy_sgemm_gflops": numpy_sgemm_gflops(), "rows": [], "params": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            pkg = build(kind, Path(tmp))
            r = bench_model(kind, pkg, batches, args.rounds, args.threads)
            result["rows"].extend(r["rows"])
            result["params"][kind] = r["params"]
    result["numpy_sgemm_gflops_after"] = numpy_sgemm_gflops()
    result["aims"] = engine_aims(result["rows"])
    (OUT / "engines.json").write_text(json.dumps(result, indent=2))
    chart(result["rows"], OUT / "engines.png")
    ceiling = max(result["numpy_sgemm_gflops"], result["numpy_sgemm_gflops_after"])
    print(f"numpy sgemm ceiling: {ceiling:.0f} GFLOP/s")
    print(f"{'model':<7} {'engine':<9} {'batch':>5} {'ms':>9} {'rec/s':>9} {'x eager':>8} {'GFLOP/s':>8} "
          f"{'% ceil':>7} {'agree':>7}")
    for r in result["rows"]:
        print(f"{r['model']:<7} {r['engine']:<9} {r['batch']:>5} {r['median_ms']:>9.2f} {r['records_per_s']:>9.0f} "
              f"{r['speedup_vs_eager']:>8.2f} {r['gflops']:>8.1f} {100 * r['gflops'] / ceiling:>6.1f}% "
              f"{100 * r['agreement']:>6.2f}%")
    print(f"wrote {OUT / 'engines.json'} and {OUT / 'engines.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
