"""Generated text on the batch job (a real local Ray) and the Kafka stream (a
real broker), held to in-process generation, and ``mmpipe verify --generate``.

One small medical set (the session's briefly trained generative package):
good records, a multi-turn record (``messages``: a follow-up answered in
context), a record whose conversation the head refuses (its tags stand, its
generated field carries the reason), and a line that is not JSON (an error
row / a dead letter, never text).  Each path's text must equal
``Generator(pkg).generate(records)`` record by record.  With
``generate.enabled`` and a package without a generative head, both paths
refuse at start, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.data")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # trains the generative package

import yaml

from pipeline.batch import JobOptions, run_batch
from pipeline.batch.output import read_errors, read_results
from pipeline.config import BatchConfig, EngineConfig, GenerateConfig, Settings, StreamConfig
from pipeline.errors import PackageError
from pipeline.generate import Generator
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import Result, jsonl_line
from pipeline.tooling import sample_data
from tests.integration import batch_helpers

ROOT = Path(__file__).resolve().parents[2]
RUN_DATE = "2026-06-01"
BROKEN = b'{"id": "medical-gen-broken", "text": "unterminated'
MULTI = "medical-gen-multi-turn"
BAD_ROLES = "medical-gen-bad-roles"


def _records() -> tuple[list[dict[str, Any]], list[bytes]]:
    """The good records (the multi-turn one included) and every wire line
    (those plus the broken one, in the middle)."""
    samples = sample_data.generate("medical", 14, seed=31, missing_rate=0.2)
    recs = [{**s.record, "id": f"medical-gen-{i}"} for i, s in enumerate(samples)]
    follow_up = sample_data.dialogues("medical", samples[0].labels)[3][0]
    recs.append({**samples[0].record, "id": MULTI, "messages": follow_up})
    recs.append({**samples[1].record, "id": BAD_ROLES, "messages": [{"role": "assistant", "content": "hello"}]})
    lines = [jsonl_line(r) for r in recs]
    return recs, [*lines[:5], BROKEN, *lines[5:]]


@pytest.fixture(scope="module")
def want(generative_package: Path) -> dict[str, tuple[str | None, str | None, str | None]]:
    """In-process generation: id -> (text, finish reason, error code)."""
    recs, _ = _records()
    out = Generator(load_package(generative_package)).generate(recs)
    got = {g.id: (g.text, g.finish_reason, g.error.code if g.error else None) for g in out}
    assert got[BAD_ROLES][2] == "bad_record" and got[MULTI][0] and got[MULTI][2] is None
    assert got[MULTI][0] != got["medical-gen-0"][0], "the follow-up must be answered in context"
    assert len({t for t, _, _ in got.values() if t}) > 2, "the package's texts should vary per record"
    return got


def _check(results: list[Result], want: dict[str, tuple[str | None, str | None, str | None]]) -> None:
    """Every good record's result carries the in-process text; the record
    the head refused keeps its tags and carries the reason instead."""
    by_id = {r.id: r for r in results}
    assert set(by_id) == set(want)
    for rid, (text, finish, code) in want.items():
        res = by_id[rid]
        assert res.ok and res.heads, rid
        assert res.generated is not None, rid
        if code is None:
            assert (res.generated.text, res.generated.finish_reason) == (text, finish), rid
        else:
            assert res.generated.text is None and res.generated.error and res.generated.error.code == code


def _settings(**generate: Any) -> Settings:
    return Settings(engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1),
                    batch=BatchConfig(batch_size=8, shard_rows=6, progress=False),
                    generate=GenerateConfig(**generate))


# -- the batch job --------------------------------------------------------------------------------------------
def test_batch_job_writes_the_generated_text(generative_package: Path, want, tmp_path: Path) -> None:
    _, lines = _records()
    src = tmp_path / "in.jsonl"
    batch_helpers.write_jsonl(src, lines)
    out = tmp_path / "out"
    with batch_helpers.local_ray():
        summary = run_batch(_settings(enabled=True), JobOptions(
            input=str(src), output=str(out), package=str(generative_package), run_date=RUN_DATE, progress=False))
        plain = run_batch(_settings(), JobOptions(input=str(src), output=str(tmp_path / "plain"),
                                                  package=str(generative_package), run_date=RUN_DATE,
                                                  progress=False))
    assert summary["records_in"] == len(lines) and summary["errors_by_reason"] == {"bad_json": 1}
    rows = read_results(out).to_pylist()
    _check([Result.model_validate_json(r["result"]) for r in rows], want)
    for r in rows:  # the columns say what the result JSON says
        text, finish, code = want[r["id"]]
        assert (r["generated_text"], r["generated_finish_reason"]) == ((text, finish) if code is None
                                                                         else (None, None)), r["id"]
    errors = read_errors(out).to_pylist()
    assert [e["error_code"] for e in errors] == ["bad_json"]
    from deltalake import DeltaTable

    table = DeltaTable(str(out)).to_pyarrow_table()
    broken = table.filter(table["error_code"].is_valid()).to_pylist()
    assert broken[0]["generated_text"] is None and broken[0]["generated_finish_reason"] is None
    # Generation off: no generated columns, no generated field, the same tags.
    assert plain["results"] == summary["results"]
    plain_rows = read_results(tmp_path / "plain")
    assert "generated_text" not in plain_rows.column_names
    assert all(Result.model_validate_json(t).generated is None for t in plain_rows.column("result").to_pylist())


def test_batch_job_refuses_generation_without_a_head(tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    batch_helpers.write_jsonl(src, _records()[1][:2])
    with pytest.raises(PackageError, match=r"generate.enabled is true but package .* has no exported generative"):
        run_batch(_settings(enabled=True), JobOptions(input=str(src), output=str(tmp_path / "out"),
                                                      package=str(tiny_packages["medical"]), progress=False))
    assert not (tmp_path / "out").exists(), "refused before anything was written"


# -- the stream ----------------------------------------------------------------------------------------------
def test_stream_results_carry_the_generated_text(broker, generative_package: Path, want, tmp_path: Path) -> None:
    from tests.integration.stream_helpers import Reader, produce, run_inprocess, settings_for, topics

    recs, lines = _records()
    names = topics(broker, partitions=2)
    keys = [r["id"].encode() for r in recs[:5]] + [b"medical-gen-broken"] + [r["id"].encode() for r in recs[5:]]
    produce(broker.bootstrap, names[0], lines, keys)
    cfg = {**settings_for(broker, generative_package, names), "generate": {"enabled": True}}
    consumer, _ = run_inprocess(cfg, tmp_path, expect=len(lines))
    reader = Reader(broker.bootstrap, names[1], names[2])
    reader.wait(lambda m: len(m) >= len(lines), 30)
    reader.close()
    _check([Result.model_validate_json(m.value) for m in reader.of(names[1])], want)
    dead = reader.of(names[2])
    assert [(m.value, dict(m.headers)["mmpipe-reason"]) for m in dead] == [(BROKEN, b"bad_json")]
    assert consumer.counts["results"] == len(recs) and consumer.counts["dlq"] == 1


def test_stream_refuses_generation_without_a_head(tiny_packages: dict[str, Path]) -> None:
    from pipeline.stream.consumer import StreamConsumer

    pkg = load_package(tiny_packages["medical"])
    pred = Predictor(pkg, None, path="stream")  # refused before any engine would run
    settings = Settings(stream=StreamConfig(input_topics=["in"], output_topic="out", dlq_topic="dlq"),
                        generate=GenerateConfig(enabled=True))
    try:
        with pytest.raises(PackageError, match=r"generate.enabled is true but package .* has no exported"):
            StreamConsumer(settings, pred)
    finally:
        pred.close()


# -- mmpipe verify --------------------------------------------------------------------------------------------
def test_mmpipe_verify_reports_generation_agreement(broker, generative_package: Path, tmp_path: Path) -> None:
    """In-process generation, the batch job and the stream, through the CLI:
    every pair agrees on every record's text, and the report holds counts, never text."""
    from tests.integration.stream_helpers import topics

    recs, lines = _records()
    records = tmp_path / "records.jsonl"
    records.write_bytes(b"\n".join(lines) + b"\n")
    names = topics(broker, partitions=1)
    cfg = tmp_path / "verify.yaml"
    cfg.write_text(yaml.safe_dump({
        "engine": {"kind": "onnxruntime", "threads": 1},
        "batch": {"ray_num_cpus": 2, "progress": False},
        "stream": {"bootstrap_servers": broker.bootstrap.split(","), "input_topics": [names[0]],
                   "output_topic": names[1], "dlq_topic": names[2], "max_wait_ms": 20,
                   "session_timeout_ms": 6000}}))
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", str(generative_package), "--records", str(records), "-c",
         str(cfg), "--no-torch", "--generate", "--batch", "--kafka", "--timeout", "120", "--json", str(report)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "generated text agreement" in proc.stdout
    rep = json.loads(report.read_text())
    gen = rep["generation"]
    assert set(gen["paths"]) == {"generate", "batch", "stream"} and gen["passed"]
    assert set(gen["pairs"]) == {"generate | batch", "generate | stream", "batch | stream"}
    for cell in gen["pairs"].values():
        assert cell["compared"] == len(lines) and cell["text_agreement"] == 1.0 and cell["missing"] == 0
    assert gen["paths"]["batch"]["texts"] == len(recs) - 1  # the refused conversation gives a reason instead
    texts = {g.text for g in Generator(load_package(generative_package)).generate(recs) if g.text}
    leaked = [t for t in texts if t in proc.stdout or t in proc.stderr or t in report.read_text()]
    assert not leaked, "generated text (patient data) must never be printed or reported"
