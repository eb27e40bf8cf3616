"""What every benchmark reports about the machine it ran on, and the chart layout they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def cpu_flags() -> list[str]:
    """The CPU's vector-instruction flags (which kernels ONNX Runtime and
    numpy can use): absolute times differ between machines with other flags,
    so every benchmark JSON records them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def model_axes(rows: list[dict[str, Any]]) -> tuple[Any, list[tuple[Any, str, list[dict[str, Any]]]]]:
    """A figure with one panel per model in ``rows``: (figure, [(axes, model, its rows)])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    return fig, [(ax, m, [r for r in rows if r["model"] == m]) for ax, m in zip(axes[0], models, strict=True)]


def aim(name: str, value: float | None, target: float, higher: bool = True) -> dict[str, Any]:
    """One entry of a benchmark JSON's ``"aims"``: met when ``value`` reaches
    ``target`` (at least, or at most with ``higher=False``)."""
    met = value is not None and (value >= target if higher else value <= target)
    return {"name": name, "value": value, "target": target, "met": met}


def fault_aims(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The fault suite's aims: no record lost in any case, no unexpected
    duplicate, every case run."""
    cases = data.get("cases") or []
    return [aim("records lost, all fault cases", sum(c["losses"] for c in cases), 0, higher=False),
            aim("fault cases failed or skipped", len(data.get("failed") or []) + len(data.get("skipped") or []), 0,
                higher=False)]


def parity_aims(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The parity matrix's aim: every pair of paths within its variant's tolerance."""
    pairs = list((data.get("pairs") or {}).values())
    share = sum(bool(p["passed"]) for p in pairs) / len(pairs) if pairs else None
    return [aim("path pairs within tolerance (share)", share, 1.0)]
