"""The batch job (Ray Data) vs a plain loop over the same Predictor and records.

What Ray Data costs or gains: records/s of ``mmpipe batch`` (its default
batch settings: one actor per CPU, each running whole shards) against ``Predictor.predict_batch``
in a loop over the same JSONL, same package (ONNX Runtime fp32), same batch
size, measured in one run at each size; output to a local Delta table and to
a Delta table on a versitygw S3 server on loopback; the job's peak memory
(driver + its own Ray processes, summed RSS sampled every 0.2 s) per size,
to show it streams.  Aims in the JSON's "aims".

    python bench/batch.py                                  # small model, 2k and 20k records
    python bench/batch.py --sizes 2000,20000,200000 --production

Writes bench/results/batch.json and bench/results/batch.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import EngineConfig  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.package import load_package  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.records import json_safe  # noqa: E402
from pipeline.spec import load_workload  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from pipeline.tooling.demo import cached_package  # noqa: E402

OUT = ROOT / "bench" / "results"


def write_input(path: Path, workload: str, records: int, copies: int = 1) -> int:
    lines = [json.dumps(json_safe(s.record)).encode() for s in sample_data.generate(workload, records)]
    n = 0
    with path.open("wb") as fh:
        for c in range(copies):
            for line in lines:
                rec = json.loads(line)
                rec["id"] = f"{rec['id']}-c{c}"
                fh.write(json.dumps(rec).encode() + b"\n")
                n += 1
    return n


def plain_loop(package: Path, path: Path, batch: int) -> float:
    pkg = load_package(package)
    pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")), batch_size=batch)
    t0 = time.perf_counter()
    n, buf = 0, []
    with path.open("rb") as fh:
        for line in fh:
            buf.append(line.rstrip(b"\n"))
            if len(buf) >= batch * 4:
                n += len(pred.predict_batch(buf))
                buf = []
    n += len(pred.predict_batch(buf))
    return n / (time.perf_counter() - t0)


def _tree_rss(marker: str, root_pid: int) -> int:
    """Summed RSS (bytes) of the driver and every process naming our Ray temp dir."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int(d.name) != root_pid and marker.encode() not in (d / "cmdline").read_bytes():
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_job(package: Path, path: Path, out: str, batch: int, fs_options: dict | None = None) -> dict:
    """``mmpipe batch`` in a subprocess with its own local Ray; returns its
    summary plus the peak summed RSS of its processes."""
    ray_tmp = tempfile.mkdtemp(prefix="mmray-b-", dir="/tmp")
    cfg = Path(ray_tmp + ".yaml")
    # The job as a user gets it: the default batch section (on CPUs, one actor
    # per CPU, each reading, decoding, inferring and writing whole shards;
    # ONNX Runtime's threads follow the actor's CPUs), only the batch size set
    # to the loop's.
    batch_cfg = {"batch_size": batch, "progress": False}
    if fs_options:
        batch_cfg["output_filesystem"] = fs_options
    cfg.write_text(json.dumps({"engine": {"kind": "onnxruntime", "device": "cpu"}, "batch": batch_cfg}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--log-level", "WARNING", "batch", "-c", str(cfg),
                             "--package", str(package), "--input", str(path), "--output", out, "--json",
                             "--run-date", "2026-05-01"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(ray_tmp, proc.pid))
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, _ = proc.communicate()
    t.join()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    cfg.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"batch job failed (exit {proc.returncode})")
    summary = json.loads(stdout)
    summary["peak_rss_mb"] = peak[0] / 2**20
    return summary


def _s3() -> tuple[object | None, str]:
    """A versitygw S3 server on loopback (the tests' fixture), or why not."""
    try:
        from tests.integration.s3_server import S3Server, versitygw_binary

        server = S3Server(versitygw_binary(), Path(tempfile.mkdtemp(prefix="mmpipe-bench-s3-")) / "data")
        server.start()
        server.create_bucket("bench")
        return server, ""
    except Exception as exc:  # no Go, no binary: the local runs still happen
        return None, f"{type(exc).__name__}: {exc}"


def _aim(name: str, value: float | None, target: float, higher: bool = True) -> dict:
    met = value is not None and (value >= target if higher else value <= target)
    return {"name": name, "value": None if value is None else round(value, 3), "target": target, "met": met}


def bench_model(model: str, package: Path, workload: str, sizes: list[int], batch: int, work: Path,
                s3: object | None) -> list[dict]:
    rows = []
    for n in sizes:
        path = work / f"{model}-{n}.jsonl"
        base = min(n, 1000)
        got = write_input(path, workload, base, copies=max(1, n // base))
        loop_rps = plain_loop(package, path, batch)
        rows.append({"model": model, "records": got, "run": "plain Predictor loop", "records_per_s": loop_rps,
                     "x_loop": 1.0})
        outs = [("local", str(work / f"out-{model}-{n}"), None)]
        if s3 is not None:
            outs.append(("s3", f"s3://bench/{model}-{n}", s3.fs_options))  # type: ignore[attr-defined]
        for kind, out, opts in outs:
            s = run_job(package, path, out, batch, opts)
            steady = s["records_this_attempt"] / max(s["stage_seconds"]["pipeline"], 1e-9)
            rows.append({"model": model, "records": got, "run": f"batch job, {kind} output",
                         "records_per_s": s["records_per_s"], "steady_records_per_s": steady,
                         "x_loop": s["records_per_s"] / loop_rps, "x_loop_steady": steady / loop_rps,
                         "wall_s": s["wall_s"], "stage_seconds": s["stage_seconds"], "peak_rss_mb": s["peak_rss_mb"],
                         "counts_match": s["counts_match"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def aims(rows: list[dict]) -> list[dict]:
    def pick(n: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["records"] >= n * 0.99 and r["records"] <= n * 1.01
                and r["run"] == "batch job, local output" and r["model"] == "small"]
        return vals[0] if vals else None

    steady = [r["x_loop_steady"] for r in rows if r["run"] == "batch job, local output" and r["model"] == "small"]
    m20, m200 = pick(20000, "peak_rss_mb"), pick(200000, "peak_rss_mb")
    return [
        _aim("job / loop end to end at 200k records (small model, local)", pick(200000, "x_loop"), 1.0),
        _aim("job / loop end to end at 20k records (small model, local)", pick(20000, "x_loop"), 0.8),
        _aim("job / loop steady, largest run (small model, local)", steady[-1] if steady else None, 1.1),
        _aim("peak memory 200k / 20k", m200 / m20 if m20 and m200 else None, 1.2, higher=False),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="retail")
    ap.add_argument("--sizes", default="2000,20000", help="record counts (the aims name 20k and 200k)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--production", action="store_true", help="also the production-sized model (slow to build)")
    ap.add_argument("--production-sizes", default="2000")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    load_at_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="mmpipe-bench-batch-"))
    s3, why = _s3()
    rows: list[dict] = []
    try:
        package, _ = cached_package(load_workload(args.workload))
        rows += bench_model("small", package, args.workload, sizes, args.batch, work, s3)
        if args.production:
            from bench.models import production_package

            prod = production_package()
            rows += bench_model("production", prod, load_package(prod).spec.name,
                                [int(x) for x in args.production_sizes.split(",")], args.batch, work, s3)
    finally:
        if s3 is not None:
            s3.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)
    data = {"machine": {"cpus": os.cpu_count(), "processor": platform.machine(),
                        "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg())},
            "workload": args.workload, "batch": args.batch, "sizes": sizes, "s3": "versitygw" if s3 else why,
            "rows": rows, "aims": aims(rows)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "batch.json").write_text(json.dumps(data, indent=2))
    _chart(rows)
    for a in data["aims"]:
        print(a)
    return 0


def _chart(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install 'mmpipe[batch]')", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5))
    names = [f"{r['model']} {r['records']}: {r['run']}" for r in rows]
    ax.barh(names, [r["x_loop"] for r in rows], label="end to end")
    ax.barh(names, [r.get("x_loop_steady", r["x_loop"]) for r in rows], alpha=0.4, label="steady")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("x the plain Predictor loop (same records, one run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "batch.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
