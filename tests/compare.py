"""One comparison of results for every test: a path's answers against the
reference Predictor's (same ids, same error codes, same labels and spans,
scores within ``PROB_TOL``).  ``mmpipe verify`` (pipeline/tooling/verify.py) is the
user-facing version with per-variant tolerances; tests hold every fp32 path
to this one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.records import Result

PROB_TOL = 1e-4
"""ONNX Runtime vs ONNX Runtime (or PyTorch) on differently padded batches"""


def difference(got: Result, want: Result) -> str | None:
    """Where ``got`` first differs from ``want``, or None when it does not."""
    if got.id != want.id:
        return f"id {got.id!r} != {want.id!r}"
    codes = (got.error.code if got.error else None, want.error.code if want.error else None)
    if codes[0] != codes[1]:
        return f"{got.id}: error {codes[0]} != {codes[1]}"
    if want.error is not None:
        return None
    if set(got.heads or {}) != set(want.heads or {}):
        return f"{got.id}: heads {sorted(got.heads or {})} != {sorted(want.heads or {})}"
    for name, wh in (want.heads or {}).items():
        gh = (got.heads or {})[name]
        if [ls.label for ls in gh.labels] != [ls.label for ls in wh.labels]:
            return f"{got.id}/{name}: labels differ"
        for lab, score in wh.scores.items():
            if abs(gh.scores.get(lab, float("inf")) - score) > PROB_TOL:
                return f"{got.id}/{name}/{lab}: score {gh.scores.get(lab)} vs {score}"
        if wh.spans is not None:
            gs = gh.spans or []
            if [(s.start, s.end, s.label) for s in gs] != [(s.start, s.end, s.label) for s in wh.spans]:
                return f"{got.id}/{name}: spans differ"
            if any(abs(a.score - b.score) > PROB_TOL for a, b in zip(gs, wh.spans, strict=True)):
                return f"{got.id}/{name}: span scores differ"
    return None


def assert_same(got: Sequence[Result | dict[str, Any]], want: Sequence[Result]) -> None:
    """``got`` (results or their JSON) answers the same as ``want``, in order."""
    results = [g if isinstance(g, Result) else Result.model_validate(g) for g in got]
    assert [r.id for r in results] == [r.id for r in want]
    for g, w in zip(results, want, strict=True):
        diff = difference(g, w)
        assert diff is None, diff
