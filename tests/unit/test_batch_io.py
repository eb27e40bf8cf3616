"""The batch job's own logic without Ray: shard planning and reading (every
JSONL line read by exactly one shard, whatever the split), Parquet manifest
rows, media folders, and the staging/commit of a run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.batch.inputs import InputError, open_filesystem, plan_shards, read_shard
from pipeline.batch.output import OutputError, RunOutput, read_errors, read_results, read_summary
from pipeline.config import Limits


@pytest.mark.parametrize("shard_bytes", [1, 7, 64, 100, 10_000])
def test_jsonl_lines_are_read_once_whatever_the_split(tmp_path: Path, shard_bytes: int) -> None:
    rng = random.Random(shard_bytes)
    lines = [json.dumps({"id": f"r{i}", "text": "x" * rng.randint(0, 90)}).encode() for i in range(40)]
    lines[5] = b"not json at all"
    lines[9] = b"\xff\xfe broken utf-8"
    body = b"\n".join(lines) + b"\n\n\r\n"  # trailing blank lines are skipped
    (tmp_path / "r.jsonl").write_bytes(body)
    fs, path = open_filesystem(str(tmp_path / "r.jsonl"))
    shards = plan_shards(fs, path, shard_bytes=shard_bytes)
    assert len({s.key for s in shards}) == len(shards)
    got = [item for s in shards for item in read_shard(fs, s, "retail", Limits())]
    assert [raw for _, raw in got] == lines
    for pos, raw in got:
        assert body[pos : pos + len(raw)] == raw  # positions are byte offsets of the lines
    again = plan_shards(*open_filesystem((tmp_path / "r.jsonl").as_uri()), shard_bytes=shard_bytes)
    assert [s.key for s in again] == [s.key for s in shards], "the same input plans the same shard keys"


def test_parquet_rows_and_media_folder(tmp_path: Path) -> None:
    rows = [{"id": f"p{i}", "workload": "retail", "text": f"t{i}" if i % 2 else None,
             "tabular": json.dumps({"price": float(i)})} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=3)
    fs, path = open_filesystem(str(tmp_path / "m.parquet"))
    shards = plan_shards(fs, path, shard_rows=4)
    assert [(s.start, s.end) for s in shards] == [(0, 1), (1, 2), (2, 4)]  # 3+3+3+1 rows, at most 4
    got = [item for s in shards for item in read_shard(fs, s, "retail", Limits())]
    assert [pos for pos, _ in got] == list(range(10))
    assert got[1][1] == {"id": "p1", "workload": "retail", "text": "t1", "tabular": {"price": 1.0}}
    assert "text" not in got[0][1]
    media = tmp_path / "media"
    (media / "a").mkdir(parents=True)
    (media / "a" / "x.png").write_bytes(b"png-bytes")
    (media / "a" / "x.txt").write_text("caption")
    (media / "y.wav").write_bytes(b"w" * 100)
    (media / "_ignored.png").write_bytes(b"hidden")
    fs, path = open_filesystem(str(media))
    shards = plan_shards(fs, path)
    recs = [r for s in shards for _, r in read_shard(fs, s, "media", Limits(max_audio_bytes=10))]
    assert sorted(recs, key=lambda r: r["id"]) == [
        {"id": "a/x", "workload": "media", "image": b"png-bytes", "text": "caption"},
        {"id": "y", "workload": "media", "audio": b"w" * 11},  # limit + 1 bytes read: refused by the size check
    ]
    with pytest.raises(InputError, match="not found"):
        plan_shards(pafs.LocalFileSystem(), str(tmp_path / "nope"))


def _tables(n_ok: int, n_err: int) -> tuple[pa.Table, pa.Table]:
    ok = pa.Table.from_pylist([{"id": f"r{i}", "model": "m", "model_version": "1", "engine": "e", "provider": "p",
                                "labels": [], "result": "{}", "source": "s", "position": i, "preprocess_ms": 0.0,
                                "infer_ms": 0.0, "postprocess_ms": 0.0} for i in range(n_ok)])
    err = pa.Table.from_pylist([{"id": "", "error_code": "bad_json", "error_message": "m", "source": "s",
                                 "position": 100 + i, "model": "m", "model_version": "1"} for i in range(n_err)])
    return ok, err


def test_staging_commit_replace_and_lock(tmp_path: Path) -> None:
    out = RunOutput(tmp_path, "2026-05-01", "retail")
    assert out.open(resume=False) == {}
    ok, err = _tables(3, 2)
    out.write_shard("k1", ok, err, {"shard": "k1", "records": 5, "ok": 3, "errors": {"bad_json": 2}})
    assert read_results(tmp_path).num_rows == 0, "staging is invisible"
    second = RunOutput(tmp_path, "2026-05-01", "retail")
    with pytest.raises(OutputError, match="another job"):
        second.open(resume=False)
    out.commit({"records_in": 5})
    out.close()
    assert read_results(tmp_path).num_rows == 3 and read_errors(tmp_path).num_rows == 2
    assert set(read_results(tmp_path).column("workload").to_pylist()) == {"retail"}
    assert read_summary(tmp_path, "2026-05-01", "retail") == {"records_in": 5}
    # resume from the published run keeps its shards; a rerun replaces the run whole
    again = RunOutput(tmp_path, "2026-05-01", "retail")
    assert set(again.open(resume=True)) == {"k1"}
    again.close()
    rerun = RunOutput(tmp_path, "2026-05-01", "retail")
    assert rerun.open(resume=False) == {}
    ok, err = _tables(1, 0)
    rerun.write_shard("k2", ok, err, {"shard": "k2", "records": 1, "ok": 1, "errors": {}})
    rerun.commit({"records_in": 1})
    rerun.close()
    assert read_results(tmp_path).num_rows == 1 and read_errors(tmp_path).num_rows == 0
    assert not list((tmp_path / "_staging").rglob("*.parquet"))


def test_cli_refuses_bad_package_and_input_with_exit_2(tmp_path: Path, tiny_packages: dict[str, Path],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.tooling.cli import main

    assert main(["batch", "--package", str(tmp_path / "nope"), "--input", str(tmp_path), "--output",
                 str(tmp_path / "o")]) == 2
    assert "model package" in capsys.readouterr().err
    assert main(["batch", "--package", str(tiny_packages["retail"]), "--input", str(tmp_path / "missing.jsonl"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["batch", "--package", str(tiny_packages["retail"]), "--input", str(tmp_path), "--output",
                 str(tmp_path / "o"), "--run-date", "yesterday"]) == 2
    assert "not a date" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run_date=yesterday").exists()
