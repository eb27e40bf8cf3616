"""Cross-path comparison logic, and `mmpipe verify` on a real exported package."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporters.onnx_export import export_package
from pipeline.cli import main
from pipeline.records import ErrorInfo, HeadResult, LabelScore, Result
from pipeline.verify import PathRun, PathSpec, compare, format_matrix, report, run_paths


def _res(rid: str, label: str, score: float, *, error: str | None = None) -> Result:
    if error:
        return Result(id=rid, model="m", model_version="1", error=ErrorInfo(code=error, message="x"))
    other = "b" if label == "a" else "a"
    head = HeadResult(type="multiclass", labels=[LabelScore(label=label, score=score)],
                      scores={label: score, other: 1 - score})
    return Result(id=rid, model="m", model_version="1", heads={"h": head})


def _run(name: str, variant: str, *results: Result) -> PathRun:
    return PathRun(name, variant, {r.id: r for r in results})


def test_identical_paths_pass() -> None:
    a = _run("a", "fp32", _res("1", "a", 0.9), _res("2", "b", 0.8), _res("3", "", 0, error="image_decode"))
    b = _run("b", "fp32", _res("1", "a", 0.9 + 5e-5), _res("2", "b", 0.8), _res("3", "", 0, error="image_decode"))
    cell = compare(a, b)
    assert cell.passed and cell.compared == 2 and cell.label_agreement == 1.0


def test_score_drift_fails_fp32_but_passes_int8() -> None:
    a = _run("a", "fp32", _res("1", "a", 0.9))
    b = _run("b", "fp32", _res("1", "a", 0.95))
    assert not compare(a, b).passed
    assert compare(a, _run("q", "int8", _res("1", "a", 0.95))).passed


def test_label_flip_missing_record_and_error_mismatch_fail() -> None:
    ref = _run("ref", "fp32", _res("1", "a", 0.9), _res("2", "a", 0.9))
    flipped = _run("x", "fp32", _res("1", "b", 0.9), _res("2", "a", 0.9))
    lost = _run("y", "fp32", _res("1", "a", 0.9))
    rejected = _run("z", "fp32", _res("1", "a", 0.9), _res("2", "", 0, error="engine"))
    assert compare(ref, flipped).label_agreement == 0.5 and not compare(ref, flipped).passed
    assert compare(ref, lost).missing == 1 and not compare(ref, lost).passed
    assert compare(ref, rejected).error_mismatch == 1 and not compare(ref, rejected).passed
    text = format_matrix([ref, lost])
    assert "LOST 1" in text


def test_a_failing_path_is_reported_not_raised() -> None:
    def boom(records: object) -> list[Result]:
        raise ConnectionError("server down")

    ok = PathSpec("ok", "fp32", lambda recs: [_res("1", "a", 0.9)])
    runs = run_paths([ok, PathSpec("down", "fp32", boom)], ["r"])
    rep = report(runs)
    assert not rep["passed"] and "server down" in rep["paths"]["down"]["failed"]
    assert "down: FAILED" in format_matrix(runs)


@pytest.fixture(scope="module")
def exported_retail(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("verify") / "retail"
    shutil.copytree(tiny_packages["retail"], dst)
    export_package(dst, ("fp32",))
    return dst


def test_mmpipe_verify_passes_on_an_exported_package(exported_retail: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "verify.json"
    assert main(["verify", str(exported_retail), "-n", "24", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["paths"]) == {"torch", "onnx-fp32"} and rep["passed"]
    assert rep["paths"]["torch"]["results"] == 24
    assert "torch" in capsys.readouterr().out


def test_mmpipe_verify_needs_two_paths(tiny_packages: dict[str, Path]) -> None:
    with pytest.raises(SystemExit, match="fewer than two paths"):
        main(["verify", str(tiny_packages["retail"]), "-n", "4"])
