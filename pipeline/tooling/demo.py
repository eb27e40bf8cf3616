"""The main job on the embedded default: all three workloads, end to end.

sample data -> train -> package -> ONNX export with parity check (all three
cached until the code changes) -> the batch job (``mmpipe batch``: Ray Data
on a local Ray, ONNX Runtime actors) over the sample records (some broken on
purpose) -> Parquet results + errors, a summary table and a label chart.
No external service is needed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pipeline
from pipeline.log import ID_KEY_ENV, id_hash_key
from pipeline.spec import BUILTIN_WORKLOADS, WorkloadSpec, load_workload

TRAIN_RECORDS = 1200
TRAIN_SEED = 0
TAG_SEED = 1


def cache_root() -> Path:
    return Path(os.environ.get("MMPIPE_CACHE", Path.home() / ".cache" / "mmpipe"))


def _code_digest() -> str:
    """Digest of mmpipe's own source: any code change retrains and re-exports."""
    import exporters

    h = hashlib.sha256(pipeline.__version__.encode())
    for root in (Path(pipeline.__file__).parent, Path(exporters.__file__).parent):
        for p in sorted(root.rglob("*")):
            if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts:
                h.update(f"{root.name}/{p.relative_to(root).as_posix()}".encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cached_package(spec: WorkloadSpec, retrain: bool = False) -> tuple[Path, dict[str, Any]]:
    """A trained, packaged and ONNX-exported model for ``spec``, from the
    cache when the code has not changed since it was built."""
    from exporters.onnx_export import export_package
    from exporters.package import build_package
    from pipeline.tooling import sample_data
    from pipeline.tooling.train import train

    target = cache_root() / "models" / f"{spec.name}-{_code_digest()}"
    if (target / "package" / "manifest.json").is_file() and not retrain:
        return target / "package", json.loads((target / "trained" / "training.json").read_text())
    # A private temp dir per process: two processes building the same model
    # at once (a test run beside a benchmark) must not delete each other's.
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    samples = sample_data.generate(spec.name, TRAIN_RECORDS, seed=TRAIN_SEED)
    report = train(spec, samples, tmp / "trained")
    build_package(tmp / "trained", tmp / "package", version="demo")
    export_package(tmp / "package", ("fp32", "int8"))
    if retrain or not (target / "package" / "manifest.json").is_file():
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its model is as good (same code, same seed)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "package" / "manifest.json").is_file():
            raise
    return target / "package", dict(report.__dict__)


def prepare_workload(name: str, out: Path, records: int, retrain: bool) -> dict[str, Any]:
    """The package (cached model, copied into ``out``) and the sample input
    (generated records plus records broken on purpose, as JSONL) of one
    workload, with the ground truth for scoring the tags."""
    from pipeline.records import jsonl_line
    from pipeline.tooling import sample_data

    spec = load_workload(name)
    cached, report = cached_package(spec, retrain)
    dst = out / "packages" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(cached, dst)
    samples = sample_data.generate(name, records, seed=TAG_SEED)
    data = out / "data" / name
    data.mkdir(parents=True, exist_ok=True)
    sample_data.write_jsonl(samples, data / "records.jsonl", data / "labels.jsonl")
    broken = sample_data.broken_records(name, TAG_SEED)
    with (data / "records.jsonl").open("ab") as fh:
        for rec, _reason in broken:
            fh.write(jsonl_line(rec) + b"\n")
    return {"spec": spec, "package": dst, "input": data / "records.jsonl", "train_f1": report.get("f1", {}),
            "labels": {s.record["id"]: s.labels for s in samples}}


def tagged_f1(spec: WorkloadSpec, tags: Path, run_date: str, labels: dict[str, Any]) -> dict[str, float]:
    """F1 of the published tags against the sample's ground truth, read back
    from the Parquet output (what a downstream consumer would see)."""
    from pipeline.batch.output import read_results
    from pipeline.records import Result
    from pipeline.tooling.train import score_results

    table = read_results(tags)
    rows = [r for r in table.to_pylist() if r["workload"] == spec.name and r["run_date"] == run_date]
    return score_results(spec, [Result.model_validate_json(r["result"]) for r in rows], labels)


def run_demo(
    out: Path, records: int = 300, retrain: bool = False, workloads: tuple[str, ...] = BUILTIN_WORKLOADS
) -> int:
    """Models (cached), sample data, then the batch job per workload on one
    local Ray, results to Parquet, a summary table and a label-count chart."""
    from pipeline.batch import JobOptions, run_batch
    from pipeline.batch.job import ray_session
    from pipeline.batch.summary import label_chart, print_table
    from pipeline.config import BatchConfig, EngineConfig, Settings

    out.mkdir(parents=True, exist_ok=True)
    if id_hash_key() is None:
        # The demo's medical records are made up, but the workload still
        # pseudonymises ids in logs: a key for this run only, never stored.
        os.environ[ID_KEY_ENV] = secrets.token_hex(32)
        print(f"record ids in logs are pseudonymised with a one-run key (set {ID_KEY_ENV} to keep one)", flush=True)
    print(f"preparing models (cached in {cache_root() / 'models'}) and sample data ...", flush=True)
    inputs = {w: prepare_workload(w, out, records, retrain) for w in workloads}
    settings = Settings(
        engine=EngineConfig(kind="onnxruntime", device="cpu"),
        batch=BatchConfig(batch_size=32, shard_bytes=2 * 2**20),
    )
    tags = out / "tags"
    run_date = dt.datetime.now(dt.UTC).date().isoformat()
    summaries = []
    with ray_session(settings) as address:
        print(f"running the batch job on Ray ({address}) ...", flush=True)
        for item in inputs.values():
            summaries.append(run_batch(settings, JobOptions(
                input=str(item["input"]), output=str(tags), run_date=run_date, package=str(item["package"]))))
    print_table(summaries)
    print(f"\n{'workload':<10} held-out F1 (train)            F1 of the published tags")
    for s in summaries:
        item = inputs[s["workload"]]
        s["train_f1"] = item["train_f1"]
        s["tagged_f1"] = tagged_f1(item["spec"], tags, run_date, item["labels"])
        f1 = " ".join(f"{k}={v:.2f}" for k, v in s["train_f1"].items())
        tf1 = " ".join(f"{k}={v:.2f}" for k, v in s["tagged_f1"].items())
        print(f"{s['workload']:<10} {f1:<30} {tf1}")
    chart = label_chart(summaries, out / "label_counts.png")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2))
    print(f"\nresults in {tags} (Parquet, run_date={run_date}/workload=...), packages in {out / 'packages'},\n"
          f"summary in {out / 'summary.json'}" + (f", chart in {chart}" if chart else ""))
    return 0 if all(s["counts_match"] for s in summaries) else 1
