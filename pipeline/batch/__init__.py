"""The nightly batch job: Ray Data over files of records or folders of media.

    inputs (JSONL / Parquet manifests, or a media folder; local or any pyarrow
    filesystem) -> shards -> decode in CPU tasks (Predictor.prepare)
    -> infer in an actor pool (Predictor.infer) -> per-shard Parquet in a
    staging directory -> one atomic swap per run (run_date=D/workload=W)

Modules: ``inputs`` (planning and reading shards), ``stages`` (the Ray Data
decode function and inference actor), ``output`` (staging, done markers,
atomic commit, reading the output back), ``summary`` (counts, stage times,
the table and the label chart), ``pushgateway`` (metrics at the end of a run)
and ``job`` (the orchestration behind ``mmpipe batch``).
"""

from __future__ import annotations

from pipeline.batch.job import BatchJobError, JobOptions, run_batch

__all__ = ["BatchJobError", "JobOptions", "run_batch"]
