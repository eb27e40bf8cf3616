"""End to end through the real command: generate -> train -> package ->
predict -> macro-F1 above 0.9 on records the model never saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.spec import load_workload
from pipeline.train import macro_f1

pytestmark = pytest.mark.slow


def mmpipe(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", *args],
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
    assert all(r["error"]["code"] and r["error"]["message"] for r in errors)
    assert f"{n_lines} records in" in pred.stderr

    labels = {}
    for line in (data / "labels.jsonl").read_text().splitlines():
        item = json.loads(line)
        labels[item["id"]] = item["labels"]
    spec = load_workload(workload)
    ok = [r for r in rows if "error" not in r]
    assert {r["id"] for r in ok} == set(labels)
    assert all(r["model_version"] == "7" for r in ok)
    for head in spec.heads:
        if head.type == "token":
            assert any(r["heads"][head.name].get("spans") for r in ok)
            continue
        truth, got = [], []
        for r in ok:
            predicted = [ls["label"] for ls in r["heads"][head.name]["labels"]]
            t = labels[r["id"]][head.name]
            if head.type == "multiclass":
                truth.append(head.labels.index(t))
                got.append(head.labels.index(predicted[0]))
            else:
                truth.append(np.isin(head.labels, t).astype(np.float32))
                got.append(np.isin(head.labels, predicted).astype(np.float32))
        f1 = macro_f1(head, truth, got)
        assert f1 >= 0.9, f"{workload}/{head.name}: macro-F1 {f1:.3f} on unseen records"
