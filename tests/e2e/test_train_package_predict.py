"""End to end through the real command: generate -> train -> package ->
predict -> macro-F1 above 0.9 on records the model never saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.records import Result
from pipeline.spec import load_workload
from pipeline.tooling.train import score_results

pytestmark = pytest.mark.slow


def mmpipe(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--log-level", "WARNING", *args],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"mmpipe {args[0]} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.parametrize("workload", ["medical", "retail", "media"])
def test_generate_train_package_predict(tmp_path: Path, workload: str) -> None:
    data, trained, pkg = tmp_path / "data", tmp_path / "trained", tmp_path / "pkg"
    mmpipe("generate", "--workload", workload, "--out", str(data), "--records", "200", "--seed", "42", "--broken")
    out = mmpipe("train", "--workload", workload, "--out", str(trained), "--min-f1", "0.9")
    assert "held-out macro-F1" in out.stdout
    mmpipe("package", "--trained", str(trained), "--out", str(pkg), "--version", "7")
    results = tmp_path / "results.jsonl"
    pred = mmpipe("predict", "--package", str(pkg), "--input", str(data / "records.jsonl"),
                  "--output", str(results))
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    n_lines = len((data / "records.jsonl").read_bytes().splitlines())
    assert len(rows) == n_lines, "one output line per input line, errors included"
    errors = [r for r in rows if "error" in r]
    assert errors, "the broken records must come back as errors"
    assert all(r["error"]["message"] for r in errors)
    from pipeline.tooling import sample_data

    expected = sorted(reason for _, reason in sample_data.broken_records(workload, 42))
    assert sorted(r["error"]["code"] for r in errors) == expected, "each broken record with its own reason"
    assert f"{n_lines} records in" in pred.stderr

    labels = {r["id"]: r["labels"] for r in map(json.loads, (data / "labels.jsonl").read_text().splitlines())}
    spec = load_workload(workload)
    ok = [Result.model_validate(r) for r in rows if "error" not in r]
    assert {r.id for r in ok} == set(labels)
    assert all(r.model_version == "7" for r in ok)
    token_heads = [h.name for h in spec.heads if h.type == "token"]
    for name in token_heads:
        assert any(r.heads[name].spans for r in ok), "token head tagged nothing"
    for head, f1 in score_results(spec, ok, labels).items():
        assert f1 >= 0.9, f"{workload}/{head}: macro-F1 {f1:.3f} on unseen records"
