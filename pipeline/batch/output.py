"""The job's output: per-shard files in a staging directory, one atomic swap.

Layout under the output root (Hive partitions, so Spark, pyarrow, pandas,
DuckDB and Athena read it as one dataset with ``run_date`` and ``workload``
columns)::

    OUT/run_date=2026-05-01/workload=retail/
        part-<shard>.parquet      results, one row per record tagged
        _errors/part-<shard>.parquet   rejected records with reason codes
        _done/<shard>.json        what each shard held (for --resume and the summary)
        _summary.json             the run's summary
    OUT/_staging/...              work in progress (never read by consumers)

Names starting with ``_`` or ``.`` are skipped by every Parquet reader's
dataset discovery, so ``pandas.read_parquet(OUT)`` sees results only.

A run (run date + workload) is written to ``_staging`` and becomes visible
in one step: ``renameat2(RENAME_EXCHANGE)`` swaps the staging directory with
the published one (Linux), so readers see the old run or the new run, never a
mix and never a gap; elsewhere two renames leave a gap of microseconds but
still never a half-written run.  A shard's files are complete before its
done marker is written, so ``--resume`` trusts exactly the shards that were
finished.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.batch.stages import LABEL_TYPE
from pipeline.log import log_event
from pipeline.records import ErrorInfo, Result

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ("id", "model", "model_version", "engine", "provider", "labels", "result", "source", "position",
                  "preprocess_ms", "infer_ms", "postprocess_ms")
ERROR_COLUMNS = ("id", "error_code", "error_message", "source", "position", "model", "model_version")
ERRORS_DIR, DONE_DIR, SUMMARY_FILE, STAGING_DIR = "_errors", "_done", "_summary.json", "_staging"

RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()), ("model", pa.string()), ("model_version", pa.string()), ("engine", pa.string()),
    ("provider", pa.string()), ("labels", LABEL_TYPE), ("result", pa.string()), ("source", pa.string()),
    ("position", pa.int64()), ("preprocess_ms", pa.float64()), ("infer_ms", pa.float64()),
    ("postprocess_ms", pa.float64()),
])
ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()), ("error_code", pa.string()), ("error_message", pa.string()), ("source", pa.string()),
    ("position", pa.int64()), ("model", pa.string()), ("model_version", pa.string()),
])


class OutputError(RuntimeError):
    """The output directory cannot be written (locked by another run, not local, ...)."""


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` then rename into place."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically; False when the OS or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


class RunOutput:
    """Staging, done markers and the commit of one run (run date + workload)."""

    def __init__(self, root: str | Path, run_date: str, workload: str) -> None:
        if "://" in str(root) and not str(root).startswith("file://"):
            raise OutputError("the output must be a local or mounted directory (atomic renames need one)")
        self.root = Path(str(root).removeprefix("file://")).resolve()
        self.rel = Path(f"run_date={run_date}") / f"workload={workload}"
        self.final = self.root / self.rel
        self.staging = self.root / STAGING_DIR / self.rel
        self._lock: IO[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def open(self, resume: bool) -> dict[str, dict[str, Any]]:
        """Lock the run and set up staging.  Returns the done markers that
        ``--resume`` may skip (none without ``resume``): from an interrupted
        attempt's staging, else from the published run."""
        self.staging.parent.mkdir(parents=True, exist_ok=True)
        self._lock = (self.staging.parent / f".{self.staging.name}.lock").open("ab")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise OutputError(f"another job is writing this run ({self.rel}); not starting a second one") from None
        if not resume:
            shutil.rmtree(self.staging, ignore_errors=True)
        elif not self.staging.is_dir() and self.final.is_dir():
            # Resuming a published run (e.g. new input files since): start from
            # its files; hard links make the copy cheap and leave it untouched.
            shutil.copytree(self.final, self.staging, copy_function=_link_or_copy)
            with contextlib.suppress(FileNotFoundError):
                (self.staging / SUMMARY_FILE).unlink()
        (self.staging / ERRORS_DIR).mkdir(parents=True, exist_ok=True)
        (self.staging / DONE_DIR).mkdir(parents=True, exist_ok=True)
        for tmp in self.staging.rglob(".tmp-*"):  # an interrupted write
            tmp.unlink()
        return self.done_markers()

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def done_markers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for p in sorted((self.staging / DONE_DIR).glob("[!.]*.json")):  # not an interrupted write's temp
            try:
                marker = json.loads(p.read_text())
            except ValueError:
                continue  # cannot happen with atomic writes; redo the shard if it does
            out[marker["shard"]] = marker
        return out

    # -- per shard -------------------------------------------------------------------------------------
    def write_shard(self, key: str, results: pa.Table, errors: pa.Table, marker: dict[str, Any]) -> None:
        """A finished shard: its result and error files, then its done marker."""
        name = f"part-{key}.parquet"
        if results.num_rows:
            tbl = results.select(list(RESULT_COLUMNS)).cast(RESULTS_SCHEMA)
            _atomic_write(self.staging / name, lambda p: pq.write_table(tbl, p, compression="zstd"))
        if errors.num_rows:
            etbl = errors.select(list(ERROR_COLUMNS)).cast(ERRORS_SCHEMA)
            _atomic_write(self.staging / ERRORS_DIR / name, lambda p: pq.write_table(etbl, p, compression="zstd"))
        text = json.dumps(marker, sort_keys=True)
        _atomic_write(self.staging / DONE_DIR / f"{key}.json", lambda p: p.write_text(text))

    def drop_shards(self, keep: set[str]) -> None:
        """Remove shards no longer among the inputs (a resumed run whose
        input lost files), so the published run matches its inputs."""
        dropped = 0
        for marker in (self.staging / DONE_DIR).glob("[!.]*.json"):
            key = marker.stem
            if key not in keep:
                dropped += 1
                for p in (self.staging / f"part-{key}.parquet", self.staging / ERRORS_DIR / f"part-{key}.parquet",
                          marker):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        if dropped:
            # Changed or removed inputs, or a different shard_bytes/shard_rows
            # (shard keys include the ranges): those shards are redone.
            log_event(logger, logging.WARNING, "resume_dropped_shards", run=str(self.rel), shards=dropped)

    # -- publishing ------------------------------------------------------------------------------------------
    def commit(self, summary: dict[str, Any]) -> None:
        """Publish staging as the run, replacing any earlier run in one step."""
        text = json.dumps(summary, indent=2, sort_keys=True)
        _atomic_write(self.staging / SUMMARY_FILE, lambda p: p.write_text(text))
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.final.exists():
            if not _exchange(self.staging, self.final):
                old = self.staging.with_name(f".old-{uuid.uuid4().hex}")
                os.rename(self.final, old)
                os.rename(self.staging, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                shutil.rmtree(self.staging, ignore_errors=True)  # now the previous run
        else:
            os.rename(self.staging, self.final)


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# -- reading the output back ---------------------------------------------------------------------------------------
def read_results(root: str | Path) -> pa.Table:
    """Every published result row, with ``run_date`` and ``workload`` columns."""
    root = Path(root)
    files = sorted(str(p) for p in root.glob("run_date=*/workload=*/part-*.parquet"))
    return _read(root, files, RESULTS_SCHEMA)


def read_errors(root: str | Path) -> pa.Table:
    """Every published error row (reason codes), with ``run_date`` and ``workload``."""
    root = Path(root)
    files = sorted(str(p) for p in root.glob(f"run_date=*/workload=*/{ERRORS_DIR}/part-*.parquet"))
    return _read(root, files, ERRORS_SCHEMA)


def read_as_results(root: str | Path) -> list[Result]:
    """Every published row as a :class:`~pipeline.records.Result`, results
    and errors alike: result rows from their ``result`` column (the
    Predictor's result JSON, as written), error rows as error results with
    their reason code.  This is the inverse of what the job writes, so a
    tool can compare the batch job's answers with any other path's."""
    out = [Result.model_validate_json(text) for text in read_results(root).column("result").to_pylist()]
    for row in read_errors(root).to_pylist():
        out.append(Result(id=row["id"] or "", workload=row["workload"], model=row["model"] or "",
                          model_version=row["model_version"] or "",
                          error=ErrorInfo(code=row["error_code"] or "", message=row["error_message"] or "")))
    return out


def read_summary(root: str | Path, run_date: str, workload: str) -> dict[str, Any]:
    return json.loads((Path(root) / f"run_date={run_date}" / f"workload={workload}" / SUMMARY_FILE).read_text())


def _read(root: Path, files: list[str], schema: pa.Schema) -> pa.Table:
    part = pa.schema([("run_date", pa.string()), ("workload", pa.string())])
    if not files:
        return pa.Table.from_pylist([], schema=pa.unify_schemas([schema, part]))
    dataset = pads.dataset(files, schema=pa.unify_schemas([schema, part]), format="parquet",
                           partitioning=pads.partitioning(part, flavor="hive"), partition_base_dir=str(root))
    return dataset.to_table()
