"""Cross-path parity matrix: one set of records through every path, into
bench/results/parity.json.

    python -m bench.parity                  # the demo's trained models (int8 included); trains the ones not cached
    python -m bench.parity --models tiny    # quick: the few-step models the test suite uses
    python bench/parity.py --out /tmp/parity.json

The paths are the ones ``tests/integration/test_parity_paths.py`` runs on
real servers (PyTorch, ONNX Runtime fp32 and int8, Ray Serve /v1 and /v2,
Triton gRPC, the Ray Data batch job, the Kafka stream): this runs that
module with pytest, which writes its report (``MMPIPE_PARITY_JSON``), adds
the pytest exit code and the run time, prints the matrix and writes the JSON
that ``bench/report.py`` renders into RESULTS.md.  With ``--models demo``
the trained models come from ``pipeline.tooling.demo.cached_package`` (the cache
``make demo`` fills), so int8 is judged on models that were trained, not on
near-tied scores.  Exit code 0 when every pair agreed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "parity.json"
TEST = "tests/integration/test_parity_paths.py"


def run(out: Path = OUT, models: str = "demo", pytest_args: list[str] | None = None) -> dict[str, Any]:
    """Run the parity module with pytest; returns (and writes to ``out``) its report."""
    with tempfile.TemporaryDirectory(prefix="mmpipe-parity-") as tmp:
        raw = Path(tmp) / "parity.json"
        env = {**os.environ, "MMPIPE_PARITY_JSON": str(raw), "MMPIPE_PARITY_MODELS": models,
               "PYTHONPATH": os.pathsep.join([str(ROOT), *([os.environ["PYTHONPATH"]]
                                                           if os.environ.get("PYTHONPATH") else [])])}
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", TEST, "-q", "-s", "-p", "no:cacheprovider", *(pytest_args or [])]
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        wall = time.monotonic() - t0
        data: dict[str, Any] = json.loads(raw.read_text()) if raw.is_file() else {"pairs": {}, "paths": {}}
    data["pytest_exit_code"] = rc
    data["wall_s"] = round(wall, 1)
    data["passed"] = rc == 0 and bool(data.get("passed"))
    data["command"] = "python -m bench.parity" + ("" if models == "demo" else f" --models {models}")
    data["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    sys.path.insert(0, str(ROOT))
    from bench.machine import parity_aims

    data["aims"] = parity_aims(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def chart(data: dict[str, Any], png: Path) -> None:
    """A heatmap of the matrix: log10 of the largest score difference per
    pair of paths, the label agreement written in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = data.get("order") or list(data.get("paths", {}))
    if not names or not data.get("pairs"):
        return
    n = len(names)
    diff = np.full((n, n), np.nan)
    agree = np.full((n, n), np.nan)
    for key, cell in data["pairs"].items():
        a, b = key.split(" | ")
        i, j = names.index(a), names.index(b)
        for x, y in ((i, j), (j, i)):
            diff[x, y] = np.log10(max(cell["max_score_diff"], 1e-9))
            agree[x, y] = cell["label_agreement"]
    fig, ax = plt.subplots(figsize=(1.2 * n + 2, 1.0 * n + 1))
    im = ax.imshow(diff, cmap="viridis", vmin=-9, vmax=0)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            if not np.isnan(agree[i, j]):
                ax.text(j, i, f"{agree[i, j]:.0%}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax, label="log10 max |score difference|")
    ax.set_title(f"Cross-path parity ({data.get('models', '?')} models): score difference, label agreement")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", choices=["demo", "tiny"], default="demo",
                   help="demo: the demo's trained models, int8 in the matrix (default); tiny: few-step models, "
                   "int8 on the trained retail model only")
    p.add_argument("--out", type=Path, default=OUT, help=f"where to write the JSON (default {OUT.relative_to(ROOT)})")
    a = p.parse_args(argv)
    data = run(a.out, a.models)
    chart(data, a.out.with_suffix(".png"))
    print(data.get("matrix", "(no matrix: the run failed before the paths ran; see the pytest output above)"))
    print(f"\nparity: {'PASS' if data['passed'] else 'FAIL'} (pytest exit {data['pytest_exit_code']}, "
          f"{data['wall_s']:.0f} s); wrote {a.out}")
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
