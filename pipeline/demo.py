"""The main job on the embedded default: all three workloads, end to end.

sample data -> train -> package -> ONNX export with parity check (all three
cached until the code changes) -> Predictor on ONNX Runtime over the sample
records (some broken on purpose) -> results JSONL + a summary.
No external service is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import pipeline
from pipeline.spec import BUILTIN_WORKLOADS, WorkloadSpec, load_workload

TRAIN_RECORDS = 1200
TRAIN_SEED = 0
TAG_SEED = 1


def cache_root() -> Path:
    return Path(os.environ.get("MMPIPE_CACHE", Path.home() / ".cache" / "mmpipe"))


def _code_digest() -> str:
    """Digest of mmpipe's own source: any code change retrains and re-exports."""
    import exporters

    h = hashlib.sha256(pipeline.__version__.encode())
    for root in (Path(pipeline.__file__).parent, Path(exporters.__file__).parent):
        for p in sorted(root.rglob("*")):
            if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
                h.update(f"{root.name}/{p.relative_to(root).as_posix()}".encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cached_package(spec: WorkloadSpec, retrain: bool = False) -> tuple[Path, dict[str, Any]]:
    """A trained, packaged and ONNX-exported model for ``spec``, from the
    cache when the code has not changed since it was built."""
    from exporters.onnx_export import export_package
    from exporters.package import build_package
    from pipeline import sample_data
    from pipeline.train import train

    target = cache_root() / "models" / f"{spec.name}-{_code_digest()}"
    if (target / "package" / "manifest.json").is_file() and not retrain:
        return target / "package", json.loads((target / "trained" / "training.json").read_text())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    samples = sample_data.generate(spec.name, TRAIN_RECORDS, seed=TRAIN_SEED)
    report = train(spec, samples, tmp / "trained")
    build_package(tmp / "trained", tmp / "package", version="demo")
    export_package(tmp / "package", ("fp32", "int8"))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target / "package", dict(report.__dict__)


def run_workload(name: str, out: Path, records: int, retrain: bool) -> dict[str, Any]:
    from pipeline import sample_data
    from pipeline.config import EngineConfig
    from pipeline.engines import create_engine
    from pipeline.package import load_package
    from pipeline.predictor import Predictor
    from pipeline.train import score_results

    spec = load_workload(name)
    cached, report = cached_package(spec, retrain)
    dst = out / "packages" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cached, dst)
    pkg = load_package(dst)
    predictor = Predictor(pkg, create_engine(pkg, EngineConfig(kind="auto", device="cpu")), path="demo")
    samples = sample_data.generate(name, records, seed=TAG_SEED)
    labels = {s.record["id"]: s.labels for s in samples}
    inputs: list[Any] = [s.record for s in samples] + [r for r, _ in sample_data.broken_records(name, TAG_SEED)]
    results = predictor.predict(inputs)
    (out / "results").mkdir(parents=True, exist_ok=True)
    with (out / "results" / f"{name}.jsonl").open("w") as fh:
        for r in results:
            fh.write(r.model_dump_json(exclude_none=True) + "\n")
    errors = Counter(r.error.code for r in results if r.error is not None)
    label_counts: dict[str, dict[str, dict[str, float]]] = {}
    for h in spec.heads:
        if h.type == "token":
            spans = Counter(s.label for r in results if r.error is None for s in r.heads[h.name].spans or [])
            label_counts[h.name] = {k: {"count": v, "mean_score": 0.0} for k, v in sorted(spans.items())}
            continue
        per: dict[str, list[float]] = {lab: [] for lab in h.labels}
        for r in results:
            if r.error is None:
                for ls in r.heads[h.name].labels:
                    per[ls.label].append(ls.score)
                    if h.type == "multiclass":
                        break  # count the top-1 class only
        label_counts[h.name] = {
            lab: {"count": len(v), "mean_score": round(float(np.mean(v)), 3) if v else 0.0} for lab, v in per.items()
        }
    return {
        "workload": name,
        "package": str(pkg.root),
        "engine": f"{predictor.engine.name} ({predictor.engine.provider})",
        "records_in": len(inputs),
        "results": sum(1 for r in results if r.error is None),
        "errors": dict(sorted(errors.items())),
        "train_f1": report.get("f1", {}),
        "tagged_f1": score_results(spec, results, labels),
        "labels": label_counts,
    }


def print_summary(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'workload':<10} {'in':>5} {'ok':>5} {'errors':>6}   held-out F1 (train)          F1 on tagged sample")
    for r in rows:
        f1 = " ".join(f"{k}={v:.2f}" for k, v in r["train_f1"].items())
        tf1 = " ".join(f"{k}={v:.2f}" for k, v in r["tagged_f1"].items())
        print(f"{r['workload']:<10} {r['records_in']:>5} {r['results']:>5} {sum(r['errors'].values()):>6}   "
              f"{f1:<28} {tf1}")
    for r in rows:
        print(f"\n{r['workload']} [{r['engine']}]: errors by reason: "
              + (", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "none"))
        for head, labs in r["labels"].items():
            cells = ", ".join(
                f"{lab} {v['count']}" + (f" ({v['mean_score']:.2f})" if v["mean_score"] else "")
                for lab, v in labs.items()
            )
            print(f"  {head:<12} {cells}")
    ok = all(r["records_in"] == r["results"] + sum(r["errors"].values()) for r in rows)
    print(f"\nrecords in = results + errors for every workload: {'yes' if ok else 'NO'}")


def run_demo(
    out: Path, records: int = 300, retrain: bool = False, workloads: tuple[str, ...] = BUILTIN_WORKLOADS
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_workload(w, out, records, retrain) for w in workloads]
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print_summary(rows)
    print(f"results in {out / 'results'}, packages in {out / 'packages'}, summary in {out / 'summary.json'}")
    return 0 if all(r["records_in"] == r["results"] + sum(r["errors"].values()) for r in rows) else 1
