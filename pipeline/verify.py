"""Cross-path parity: one set of records, every configured path, one answer.

A record must get the same labels, and scores within the tolerance of the
model variant, whichever way it travels: the PyTorch reference, ONNX Runtime
(fp32 / fp16 / int8), Ray Serve over HTTP (the friendly ``/v1`` API and the
Open Inference Protocol), Triton over gRPC, the Ray Data batch job or the
Kafka stream.  Each path is a function from raw records to results keyed by
record id; the comparison is path x path, so a difference is located, not
just detected.

Paths that serve the same numbers (every fp32 path) are held to the fp32
tolerance: identical labels and scores within 1e-4.  A reduced-precision
variant is held to its own tolerance (the one its export's parity gate used)
against any other path.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from exporters.parity import TOLERANCES, Tolerance
from pipeline.config import EngineConfig, Settings
from pipeline.engines import create_engine
from pipeline.package import ModelPackage
from pipeline.predictor import Predictor
from pipeline.records import Result

Runner = Callable[[Sequence[Any]], list[Result]]


@dataclass
class PathSpec:
    """A way for records to travel.  ``variant`` names the numbers it serves
    (fp32, fp16 or int8), which sets its tolerance."""

    name: str
    variant: str
    run: Runner


@dataclass
class PathRun:
    name: str
    variant: str
    results: dict[str, Result] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Cell:
    """Path ``a`` against path ``b`` over the records both answered."""

    compared: int
    label_agreement: float
    max_score_diff: float
    missing: int
    error_mismatch: int
    passed: bool


def _labels(res: Result) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, head in (res.heads or {}).items():
        if head.spans is not None:
            out[name] = tuple((s.start, s.end, s.label) for s in head.spans)
        elif head.type == "multiclass":
            out[name] = head.labels[0].label if head.labels else None
        else:
            out[name] = tuple(sorted(x.label for x in head.labels))
    return out


def _max_diff(a: Result, b: Result) -> float:
    worst = 0.0
    for name, ha in (a.heads or {}).items():
        hb = (b.heads or {}).get(name)
        if hb is None:
            return float("inf")
        for lab, s in ha.scores.items():
            worst = max(worst, abs(s - hb.scores.get(lab, float("inf"))))
    return worst


def tolerance(variant_a: str, variant_b: str) -> Tolerance:
    """The looser of two variants' tolerances: fp32 against int8 is judged
    as int8 is."""
    order = ["fp32", "fp16", "int8"]
    return TOLERANCES[max(variant_a, variant_b, key=order.index)]


def compare(a: PathRun, b: PathRun) -> Cell:
    """Compare two runs record by record.  A record one path rejected and
    the other answered is an error mismatch; one a path did not return at
    all is missing (a loss)."""
    tol = tolerance(a.variant, b.variant)
    agree = compared = missing = mismatched = 0
    worst = 0.0
    for rid in a.results.keys() | b.results.keys():
        ra, rb = a.results.get(rid), b.results.get(rid)
        if ra is None or rb is None:
            missing += 1
            continue
        if ra.ok != rb.ok or (not ra.ok and ra.error and rb.error and ra.error.code != rb.error.code):
            mismatched += 1
            continue
        if not ra.ok:
            continue
        compared += 1
        agree += _labels(ra) == _labels(rb)
        worst = max(worst, _max_diff(ra, rb))
    agreement = agree / compared if compared else 1.0
    ok = missing == 0 and mismatched == 0 and agreement >= tol.agreement and worst <= tol.prob_abs
    return Cell(compared, agreement, worst, missing, mismatched, ok)


def run_paths(paths: Sequence[PathSpec], records: Sequence[Any]) -> list[PathRun]:
    """Run every path over the same records.  A path that fails as a whole
    (its server is down, say) is reported with its error, not raised, so the
    matrix still shows the others."""
    runs = []
    for p in paths:
        run = PathRun(p.name, p.variant)
        try:
            for res in p.run(records):
                run.results[res.id] = res
        except Exception as exc:  # reported in the matrix
            run.error = f"{type(exc).__name__}: {str(exc)[:300]}"
        runs.append(run)
    return runs


def report(runs: Sequence[PathRun]) -> dict[str, Any]:
    """Everything ``mmpipe verify`` prints and writes: per path its counts,
    and per pair of paths the cell."""
    ok_runs = [r for r in runs if r.error is None]
    cells = {f"{a.name} | {b.name}": asdict(compare(a, b))
             for i, a in enumerate(ok_runs) for b in ok_runs[i + 1:]}
    return {
        "paths": {r.name: {"variant": r.variant, "results": len(r.results),
                           "errors": sum(not x.ok for x in r.results.values()), "failed": r.error}
                  for r in runs},
        "pairs": cells,
        "passed": all(r.error is None for r in runs) and all(c["passed"] for c in cells.values()),
    }


def format_matrix(runs: Sequence[PathRun]) -> str:
    """The path x path table: max score difference / label agreement."""
    ok_runs = [r for r in runs if r.error is None]
    names = [r.name for r in ok_runs]
    width = max([len(n) for n in names] + [10])
    lines = ["max |score diff| / label agreement (PASS unless marked)", " " * width + " | " +
             " | ".join(n.rjust(17) for n in names)]
    for a in ok_runs:
        cells = []
        for b in ok_runs:
            if a is b:
                cells.append("-".rjust(17))
                continue
            c = compare(a, b)
            mark = "" if c.passed else "!"
            text = f"{c.max_score_diff:.1e}/{c.label_agreement:.1%}{mark}"
            if c.missing or c.error_mismatch:
                text = f"LOST {c.missing} ERR {c.error_mismatch}"
            cells.append(text.rjust(17))
        lines.append(a.name.ljust(width) + " | " + " | ".join(cells))
    for r in runs:
        if r.error is not None:
            lines.append(f"{r.name}: FAILED: {r.error}")
    return "\n".join(lines)


# --- path runners -----------------------------------------------------------


def predictor_path(name: str, variant: str, package: ModelPackage, engine: EngineConfig,
                   settings: Settings, batch_size: int = 32) -> PathSpec:
    """A path through an in-process Predictor (torch, ONNX Runtime, or a
    Triton / Ray Serve server through the Open Inference Protocol)."""

    def run(records: Sequence[Any]) -> list[Result]:
        pred = Predictor(package, create_engine(package, engine), limits=settings.limits, media=settings.media,
                         batch_size=batch_size, path="verify")
        try:
            return pred.predict(records)
        finally:
            pred.close()

    return PathSpec(name, variant, run)


def serve_v1_path(url: str, workload: str, timeout_s: float = 60.0, chunk: int = 32) -> PathSpec:
    """Ray Serve's friendly endpoint, ``POST /v1/{workload}/predict``."""

    def run(records: Sequence[Any]) -> list[Result]:
        out: list[Result] = []
        for i in range(0, len(records), chunk):
            body = json.dumps({"records": [r if isinstance(r, dict) else json.loads(r)
                                           for r in records[i:i + chunk]]}).encode()
            req = urllib.request.Request(f"{url.rstrip('/')}/v1/{workload}/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                doc = json.loads(resp.read())
            out.extend(Result.model_validate(r) for r in doc["results"])
        return out

    return PathSpec("serve-v1", "fp32", run)


def package_paths(package: ModelPackage, settings: Settings, *, torch: bool = True) -> list[PathSpec]:
    """The in-process paths a package offers: PyTorch (when it carries
    weights and torch is installed) and each ONNX variant it holds."""
    paths: list[PathSpec] = []
    base = settings.engine
    if torch and "torch" in package.manifest.variants:
        try:
            import torch as _torch  # noqa: F401
        except ImportError:
            pass
        else:
            cfg = base.model_copy(update={"kind": "torch", "device": "cpu"})
            paths.append(predictor_path("torch", "fp32", package, cfg, settings))
    for variant in ("fp32", "fp16", "int8"):
        if f"onnx-{variant}" in package.manifest.variants:
            cfg = base.model_copy(update={"kind": "onnxruntime", "variant": variant})
            paths.append(predictor_path(f"onnx-{variant}", variant, package, cfg, settings))
    return paths


def oip_path(name: str, package: ModelPackage, settings: Settings, url: str, protocol: str,
             model: str | None = None) -> PathSpec:
    """A server that speaks the Open Inference Protocol (Triton, or Ray
    Serve's ``/v2``), fed tensors by the Predictor's Triton engine."""
    cfg = settings.engine.model_copy(update={
        "kind": "triton", "triton_url": url, "triton_protocol": protocol, "triton_model": model})
    return predictor_path(name, "fp32", package, cfg, settings)


# --- mmpipe verify ------------------------------------------------------------


def _records(path: str | None, package: ModelPackage, n: int) -> list[Any]:
    if path:
        with open(path, "rb") as f:
            return [line for line in f.read().splitlines() if line.strip()]
    from pipeline import sample_data
    from pipeline.spec import BUILTIN_WORKLOADS

    if package.spec.name not in BUILTIN_WORKLOADS:
        raise SystemExit(f"package {package.name} is for workload {package.spec.name!r}, which has no built-in "
                         "sample data: pass --records FILE.jsonl with records of your own")
    # Missing modalities on purpose: the presence masks must agree too.
    return [s.record for s in sample_data.generate(package.spec.name, n, seed=11, missing_rate=0.3)]


def cmd_verify(args: Any) -> int:
    from pipeline.config import load_settings
    from pipeline.package import load_package

    settings = load_settings(args.config)
    package = load_package(args.package)
    records = _records(args.records, package, args.n)
    paths = package_paths(package, settings, torch=not args.no_torch)
    if args.serve_url:
        host = args.serve_url.split("://", 1)[-1].rstrip("/")
        paths.append(serve_v1_path(args.serve_url, package.spec.name))
        paths.append(oip_path("serve-v2", package, settings, host, "http", args.serve_model or package.name))
    if args.triton_url:
        paths.append(oip_path("triton-grpc", package, settings, args.triton_url, "grpc",
                              args.triton_model or package.name))
    if len(paths) < 2:
        raise SystemExit("fewer than two paths to compare: export the package to ONNX "
                         "(mmpipe export) or pass --serve-url / --triton-url")
    runs = run_paths(paths, records)
    print(format_matrix(runs))
    rep = report(runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    print(f"{len(records)} records, {len(runs)} paths: {'PASS' if rep['passed'] else 'FAIL'}")
    return 0 if rep["passed"] else 3


def add_parser(sub: Any) -> None:
    import argparse

    v = sub.add_parser(
        "verify", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="check that every path gives the same answers for a package",
        description="Send one set of records through every configured path and compare the\n"
        "answers path by path: labels must be identical and scores within the\n"
        "tolerance of the variant (fp32 1e-4; fp16 0.02 and int8 0.15 with 99%% label\n"
        "agreement).  In-process paths are always checked: PyTorch (if the package\n"
        "has weights and torch is installed) and every exported ONNX variant.\n"
        "Servers are checked when named: Ray Serve (both /v1 and the Open Inference\n"
        "Protocol) and Triton (gRPC).  Prints a path x path matrix of the largest\n"
        "score difference and the label agreement; exits 3 when a pair disagrees.",
        epilog="""\
examples:
  mmpipe verify packages/retail
  mmpipe verify packages/retail --records my-records.jsonl --json verify.json
  mmpipe verify packages/retail --serve-url http://localhost:8000 --triton-url localhost:8001""",
    )
    v.add_argument("package", help="model package directory")
    v.add_argument("--config", "-c", metavar="YAML", help="settings file (limits, media, engine options)")
    v.add_argument("--records", help="records JSONL (default: built-in sample records of the package's workload)")
    v.add_argument("-n", type=int, default=64, help="sample records to generate when --records is not given")
    v.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    v.add_argument("--serve-url", help="a running mmpipe Ray Serve app, e.g. http://localhost:8000")
    v.add_argument("--serve-model", help="the model's name there (default: the package name)")
    v.add_argument("--triton-url", help="a Triton gRPC endpoint, e.g. localhost:8001")
    v.add_argument("--triton-model", help="the model's name in Triton (default: the package name)")
    v.add_argument("--json", help="write the report as JSON here")
    v.set_defaults(func=cmd_verify)
