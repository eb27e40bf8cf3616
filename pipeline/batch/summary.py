"""The run summary: counts, the identity that nothing was lost, stage times,
label counts; printed as a table and drawn as a label-count chart.

Counts are summed from the shards' done markers, not from in-memory
counters, so a resumed run reports the whole run (the shards done before the
interruption plus the rest) and the numbers always match the files.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any


def aggregate(markers: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the done markers of a run."""
    errors: Counter[str] = Counter()
    labels: dict[str, Counter[str]] = {}
    out: dict[str, Any] = {"records_in": 0, "results": 0, "decode_s": 0.0, "infer_s": 0.0}
    nodes: dict[str, set[str]] = {"decode": set(), "infer": set()}
    for m in markers:
        for stage, ids in m.get("nodes", {}).items():
            nodes.setdefault(stage, set()).update(ids)
        out["records_in"] += m["records"]
        out["results"] += m["ok"]
        out["decode_s"] += m.get("decode_s", 0.0)
        out["infer_s"] += m.get("infer_s", 0.0)
        errors.update(m["errors"])
        for head, counts in m.get("labels", {}).items():
            labels.setdefault(head, Counter()).update(counts)
    out["errors_by_reason"] = dict(sorted(errors.items()))
    out["errors"] = sum(errors.values())
    out["nodes"] = {stage: sorted(ids) for stage, ids in nodes.items()}
    out["labels"] = {h: dict(sorted(c.items())) for h, c in sorted(labels.items())}
    return out


def print_table(summaries: list[dict[str, Any]], out: IO[str] | None = None) -> None:
    """A readable table: one line per run, then errors by reason, stage
    times and label counts per workload."""
    out = out or sys.stdout
    w = out.write
    w(f"\n{'workload':<10} {'run_date':<10} {'in':>7} {'results':>7} {'errors':>6} {'skipped':>7} "
      f"{'rec/s':>7} {'wall s':>7}  engine\n")
    for s in summaries:
        w(f"{s['workload']:<10} {s['run_date']:<10} {s['records_in']:>7} {s['results']:>7} {s['errors']:>6} "
          f"{s['shards_skipped']:>7} {s['records_per_s']:>7.1f} {s['wall_s']:>7.1f}  {s['engine']}\n")
    for s in summaries:
        st = s["stage_seconds"]
        w(f"\n{s['workload']}: errors by reason: "
          + (", ".join(f"{k}={v}" for k, v in s["errors_by_reason"].items()) or "none") + "\n")
        w("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
          + "  (decode and infer summed over workers)\n")
        for head, counts in s["labels"].items():
            cells = ", ".join(f"{lab} {n}" for lab, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            w(f"  {head:<12} {cells}\n")
    ok = all(s["counts_match"] for s in summaries)
    w(f"\nrecords in = results + errors for every run: {'yes' if ok else 'NO'}\n")


def label_chart(summaries: list[dict[str, Any]], path: Path) -> Path | None:
    """A PNG of label counts per workload (one panel each, one bar per
    head:label).  Returns None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4.8), squeeze=False)
    for ax, s in zip(axes[0], summaries, strict=True):
        bars = [(f"{head}: {lab}", n) for head, counts in s["labels"].items() for lab, n in counts.items()]
        names = [b[0] for b in bars][::-1]
        ax.barh(names, [b[1] for b in bars][::-1], color="#4c72b0")
        ax.set_title(f"{s['workload']} ({s['results']} tagged, {s['errors']} rejected)")
        ax.set_xlabel("count (records; spans for token heads)")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("mmpipe batch: label counts per workload")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
