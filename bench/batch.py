"""The batch job (Ray Data) vs a plain loop over the same Predictor and records.

What Ray Data costs or gains: records/s of ``mmpipe batch`` (decode tasks +
inference actors, 1 and 2 actors) against ``Predictor.predict`` in a loop on
the same JSONL, same package (ONNX Runtime fp32), same batch size; and the
job's peak memory (driver + its own Ray processes, summed RSS sampled every
0.2 s) at 1x and 10x the input, to show it streams.

    python bench/batch.py                       # retail, 500 records (+ broken ones), 10x for memory
    python bench/batch.py --records 200 --workload media

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
                n += len(pred.predict(buf))
                buf = []
    n += len(pred.predict(buf))
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


def run_job(package: Path, path: Path, out: Path, batch: int, concurrency: int) -> dict:
    """``mmpipe batch`` in a subprocess with its own local Ray; returns its
    summary plus the peak summed RSS of its processes."""
    ray_tmp = tempfile.mkdtemp(prefix="mmray-b-", dir="/tmp")
    cfg = out.with_suffix(".yaml")
    # Actors share the CPUs left after one decode task (2 cores: 1 CPU for the actors).
    cpus = os.cpu_count() or 2
    actor_cpus = max(0.25, (cpus - 1) / concurrency)
    cfg.write_text(f"engine: {{kind: onnxruntime, device: cpu, threads: 1}}\nbatch: {{batch_size: {batch}, "
                   f"concurrency: {concurrency}, actor_num_cpus: {actor_cpus}, progress: false, "
                   f"shard_bytes: 262144}}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--log-level", "WARNING", "batch", "-c", str(cfg),
                             "--package", str(package), "--input", str(path), "--output", str(out), "--json",
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
    if proc.returncode != 0:
        raise RuntimeError(f"batch job failed (exit {proc.returncode})")
    summary = json.loads(stdout)
    summary["peak_rss_mb"] = peak[0] / 2**20
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="retail")
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--scale", type=int, default=10, help="memory check at this many times the input")
    args = ap.parse_args()
    package, _ = cached_package(load_workload(args.workload))
    work = Path(tempfile.mkdtemp(prefix="mmpipe-bench-batch-"))
    small = work / "small.jsonl"
    n = write_input(small, args.workload, args.records)
    rows = []
    loop_rps = plain_loop(package, small, args.batch)
    rows.append({"run": "plain Predictor loop", "records": n, "records_per_s": loop_rps, "x_loop": 1.0})
    for conc in (1, 2):
        s = run_job(package, small, work / f"out-c{conc}", args.batch, conc)
        steady = n / s["stage_seconds"]["pipeline"]
        rows.append({"run": f"Ray Data job, {conc} actor(s)", "records": n, "records_per_s": s["records_per_s"],
                     "steady_records_per_s": steady, "x_loop": s["records_per_s"] / loop_rps,
                     "x_loop_steady": steady / loop_rps, "wall_s": s["wall_s"],
                     "ray_start_s": s["stage_seconds"]["ray_start"], "peak_rss_mb": s["peak_rss_mb"]})
    big = work / "big.jsonl"
    nb = write_input(big, args.workload, args.records, copies=args.scale)
    s_big = run_job(package, big, work / "out-big", args.batch, 1)
    mem = {"records_1x": n, "records_10x": nb, "peak_rss_mb_1x": rows[1]["peak_rss_mb"],
           "peak_rss_mb_10x": s_big["peak_rss_mb"], "ratio": s_big["peak_rss_mb"] / rows[1]["peak_rss_mb"],
           "records_per_s_10x": s_big["records_per_s"]}
    data = {"machine": {"cpus": os.cpu_count(), "processor": platform.machine()}, "workload": args.workload,
            "batch": args.batch, "rows": rows, "memory": mem}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "batch.json").write_text(json.dumps(data, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.barh([r["run"] for r in rows], [r["records_per_s"] for r in rows], label="end to end")
        a1.barh([r["run"] for r in rows[1:]], [r["steady_records_per_s"] for r in rows[1:]], alpha=0.5,
                label="steady (without Ray start)")
        a1.set_xlabel("records/s")
        a1.legend(fontsize=8)
        a2.bar(["1x", f"{args.scale}x"], [mem["peak_rss_mb_1x"], mem["peak_rss_mb_10x"]])
        a2.set_ylabel("peak RSS, MB (driver + Ray processes)")
        fig.tight_layout()
        fig.savefig(OUT / "batch.png", dpi=100)
    except ImportError:
        print("no chart: matplotlib is not installed (pip install 'mmpipe[batch]')", file=sys.stderr)
    for r in rows:
        print(r)
    print(mem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
