"""Run the fault suite and write bench/results/faults.json.

    python -m bench.faults                 # every case (about 5 minutes on 2 cores)
    python bench/faults.py -k stream       # a subset, by pytest -k expression
    python -m bench.faults --out /tmp/faults.json

The cases are the tests under ``tests/faults/`` (real Kafka broker, Ray
Serve, tritonserver, Ray Data on a local Ray): each breaks something while
records flow and reports records sent, results, DLQ/error entries,
duplicates and losses (which must be 0).  This runs them with pytest,
collects their outcomes (``MMPIPE_FAULTS_OUT``), adds the pytest exit code
and the run time, prints the table and writes the JSON that
``bench/report.py`` renders into RESULTS.md.  Exit code 0 when every case
passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "faults.json"
OUT_ENV = "MMPIPE_FAULTS_OUT"  # read by tests/faults/conftest.py


def run(out: Path = OUT, pytest_args: list[str] | None = None) -> dict[str, Any]:
    """Run the suite with pytest; returns (and writes to ``out``) the outcomes."""
    with tempfile.TemporaryDirectory(prefix="mmpipe-faults-") as tmp:
        raw = Path(tmp) / "outcomes.json"
        env = {**os.environ, OUT_ENV: str(raw), "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider",
                             *(pytest_args or [])], cwd=ROOT, env=env, check=False).returncode
        wall = time.monotonic() - t0
        data: dict[str, Any] = json.loads(raw.read_text()) if raw.is_file() else {"cases": [], "skipped": [],
                                                                                    "failed": []}
    data["pytest_exit_code"] = rc
    data["wall_s"] = round(wall, 1)
    data["all_passed"] = rc == 0 and data.get("all_passed", False)
    data["command"] = "python -m bench.faults" + "".join(f" {a}" for a in pytest_args or [])
    sys.path.insert(0, str(ROOT))
    from bench.machine import fault_aims

    data["aims"] = fault_aims(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def chart(data: dict[str, Any], png: Path) -> None:
    """Per case: records sent, results, error entries, duplicates and
    losses side by side (losses must be a zero-height bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data.get("cases") or []
    if not cases:
        return
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(cases) + 1.5))
    kinds = [("sent", "sent"), ("received", "results"), ("errors", "DLQ/errors"), ("duplicates", "duplicates"),
             ("losses", "losses")]
    h = 0.8 / len(kinds)
    for k, (key, label) in enumerate(kinds):
        ax.barh([i + k * h for i in range(len(cases))], [c[key] for c in cases], height=h, label=label)
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(cases))], [f"{c['case']} ({c['path']})" for c in cases])
    ax.invert_yaxis()
    ax.set_xlabel("records")
    ax.set_title("Fault suite: every record sent comes out as a result or an error (losses 0)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT, help=f"where to write the JSON (default {OUT.relative_to(ROOT)})")
    p.add_argument("-k", dest="select", help="only the cases matching this pytest -k expression")
    a = p.parse_args(argv)
    data = run(a.out, ["-k", a.select] if a.select else [])
    chart(data, a.out.with_suffix(".png"))
    sys.path.insert(0, str(ROOT))
    from tests.faults.outcome import FaultOutcome, table

    print()
    print(table(FaultOutcome(**c) for c in data["cases"]))
    for s in data.get("skipped", []):
        print(f"skipped {s['test']}: {s['reason']}")
    print(f"\n{len(data['cases'])} cases in {data['wall_s']:.0f} s; "
          f"{'all passed' if data['all_passed'] else 'FAILED: ' + ', '.join(data.get('failed') or ['see above'])}; "
          f"wrote {a.out}")
    return 0 if data["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
