"""Fault case 6, the part that runs inside a private mount namespace.

    unshare --mount python -m tests.faults.disk_full --dir D --small 96k --large 64m \\
        --package P --input records.jsonl --config batch.yaml --report report.json

mounts a tmpfs of ``--small`` size on ``D``, runs ``mmpipe batch`` with its
output there until the filesystem is full, looks at what the failed run left
visible, grows the tmpfs to ``--large`` (``mount -o remount``, the same files
kept) and reruns with ``--resume``.  What it saw goes to ``--report`` as
JSON for the test to judge (tests/faults/test_batch_faults.py).

It runs in its own mount namespace (``unshare --mount`` as root, or
``unshare -rm`` as a user with user namespaces) so the small filesystem is
never visible outside and disappears with the process, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUN_DATE = "2026-05-01"


def _mount(args: list[str]) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"mount {' '.join(args)} failed: {res.stderr.strip()}")


def _batch(a: argparse.Namespace, out: Path, *, resume: bool) -> dict[str, Any]:
    ray_tmp = tempfile.mkdtemp(prefix="mmray-df-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "batch", "-c", a.config,
           "--package", a.package, "--input", a.input, "--output", str(out), "--run-date", RUN_DATE,
           "--no-progress", "--json", *(["--resume"] if resume else [])]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    subprocess.run(["rm", "-rf", ray_tmp], check=False)
    return {"rc": res.returncode, "stderr": res.stderr[-3000:], "stdout": res.stdout[-20000:]}


def _visible(out: Path) -> dict[str, Any]:
    """What a reader of the output sees: published runs and their rows."""
    from pipeline.batch.output import read_errors, read_results

    final = out / f"run_date={RUN_DATE}"
    staging = out / "_staging" / f"run_date={RUN_DATE}"
    return {
        "final_exists": final.exists(),
        "published_result_rows": read_results(out).num_rows if out.exists() else 0,
        "published_error_rows": read_errors(out).num_rows if out.exists() else 0,
        "staging_done_markers": len(list(staging.glob("workload=*/_done/[!.]*.json"))),
        "staging_temp_files": len(list(staging.rglob(".tmp-*"))),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--dir", "--small", "--large", "--package", "--input", "--config", "--report"):
        p.add_argument(name, required=True)
    a = p.parse_args(argv)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={a.small}", "tmpfs", str(d)])
    report: dict[str, Any] = {"small": a.small, "large": a.large}
    try:
        out = d / "tags"
        report["full"] = _batch(a, out, resume=False)
        report["after_full"] = _visible(out)
        df = os.statvfs(d)
        report["free_bytes_after_full"] = df.f_bavail * df.f_frsize
        _mount(["-o", f"remount,size={a.large}", str(d)])
        report["rerun"] = _batch(a, out, resume=True)
        report["after_rerun"] = _visible(out)
        from pipeline.batch.output import read_errors, read_results

        report["results"] = [{"position": r["position"], "id": r["id"], "result": r["result"]}
                             for r in read_results(out).to_pylist()]
        report["errors"] = [{"position": e["position"], "code": e["error_code"]}
                            for e in read_errors(out).to_pylist()]
    finally:
        Path(a.report).write_text(json.dumps(report))
        subprocess.run(["umount", str(d)], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
