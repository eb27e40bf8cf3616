"""Every benchmark in one go, then bench/RESULTS.md regenerated from the results.

    python -m bench.run_all                       # everything (about an hour on 2 cores)
    python -m bench.run_all --only parity,faults  # a subset
    python -m bench.run_all --skip serving        # everything else
    make bench                                    # the same as the first line

The steps, in order (each one a script that also runs on its own):

    engines   bench/engines.py      PyTorch eager vs ONNX Runtime fp32/fp16/int8 (CPU)
    gpu       bench/gpu_checks.py   CUDA / TensorRT rows; says "no GPU" and measures nothing without one
    serving   bench/serving.py      Ray Serve vs Triton, dynamic batching vs none, 1-64 clients
    batch     bench/batch.py        the Ray Data job vs a plain loop, peak memory at 1x and 10x input
    stream    bench/stream.py       the Kafka stream vs the bare Predictor, latency at a steady rate
    parity    bench/parity.py       the cross-path parity matrix (every path, same records)
    faults    bench/faults.py       the fault suite: sent / results / errors / duplicates / losses
    generate  bench/generate.py     generation: ORT vs eager, KV cache vs recomputing, tokens/s

A step that fails is reported and the others still run (a broken Triton
must not cost the parity matrix); the exit code is 1 when any step failed.
Each step writes bench/results/NAME.json (+ a PNG where it has a chart);
the report is rendered from whatever results exist, so a subset run keeps
the other sections from their last run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

STEPS: dict[str, list[str]] = {
    "engines": ["bench/engines.py"],
    "gpu": ["bench/gpu_checks.py"],
    "serving": ["bench/serving.py"],
    "batch": ["bench/batch.py"],
    "stream": ["bench/stream.py"],
    "parity": ["-m", "bench.parity"],
    "faults": ["-m", "bench.faults"],
    "generate": ["bench/generate.py"],
}


def _names(text: str | None) -> list[str]:
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise SystemExit(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma list of steps to run (default: all)")
    p.add_argument("--skip", help="comma list of steps not to run")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    a = p.parse_args(argv)
    only, skip = _names(a.only), set(_names(a.skip))
    steps = [s for s in (only or list(STEPS)) if s not in skip]
    if not steps:
        print("error: no step left to run", file=sys.stderr)
        return 2
    outcome: dict[str, dict[str, float | int]] = {}
    for name in steps:
        cmd = [sys.executable, *STEPS[name]]
        print(f"\n=== {name}: {' '.join(['python', *STEPS[name]])}", flush=True)
        if a.dry_run:
            continue
        t0 = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        outcome[name] = {"exit_code": rc, "wall_s": round(time.monotonic() - t0, 1)}
        print(f"=== {name}: exit {rc} after {outcome[name]['wall_s']:.0f} s", flush=True)
    if a.dry_run:
        return 0
    rc = subprocess.run([sys.executable, "bench/report.py"], cwd=ROOT, check=False).returncode
    failed = [n for n, o in outcome.items() if o["exit_code"] != 0]
    print("\n" + "\n".join(f"{n:<8} exit {o['exit_code']:>3}  {o['wall_s']:>7.0f} s" for n, o in outcome.items()))
    if failed:
        print(f"FAILED: {', '.join(failed)} (the report shows the last good results of those)", file=sys.stderr)
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
