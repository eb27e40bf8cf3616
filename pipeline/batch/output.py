"""The job's output: a Delta Lake table, one atomic commit per run.

The output root (a local directory, ``s3://bucket/prefix``, ``gs://...``:
anything pyarrow's filesystems and delta-rs reach) is a Delta table
partitioned by ``run_date`` and ``workload``::

    OUT/_delta_log/00000000000000000003.json     the table's history (commits)
    OUT/run_date=D/workload=W/part-<shard>-....parquet   data files (results and errors)
    OUT/_mmpipe/staging/run_date=D/workload=W/<shard>.json   finished shards (--resume)
    OUT/_mmpipe/runs/run_date=D/workload=W/summary.json      the last published run's summary

Why a table format: object storage has no rename, so "write to staging,
rename into place" cannot publish a run atomically there.  Delta Lake's log
can: inference workers write their Parquet files straight into the table's
directory, where no Delta reader looks until a commit names them, and the
driver publishes the run with **one** commit that removes every file of the
run's partition and adds the new ones (``mode="overwrite"`` with a partition
filter for the run date and workload).  A reader (delta-rs / ``to_pandas``,
DuckDB's ``delta_scan``, Spark, Trino) reads one table version, so it sees
the previous run or the new run, never a mix; a job killed before its commit
leaves only unreferenced files (``DeltaTable.vacuum`` removes them later).
Delta over Iceberg here: it needs no catalog service (the log lives beside
the data, which suits a job that writes to a bucket), and delta-rs commits
files written by other processes (``create_write_transaction``), so the
workers never hand their rows to the driver.

Every input record is one row: a result (``error_code`` null, ``labels``
and the Predictor's ``result`` JSON) or a rejected record (``error_code``,
``error_message``).  Done markers are written by the driver once all of a
shard's rows are in files; ``--resume`` trusts exactly those.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.batch.inputs import open_filesystem
from pipeline.log import log_event
from pipeline.records import Result

logger = logging.getLogger(__name__)

LABEL_TYPE = pa.list_(pa.struct([("head", pa.string()), ("label", pa.string()), ("score", pa.float64())]))
FILE_SCHEMA = pa.schema([
    ("id", pa.string()), ("error_code", pa.string()), ("error_message", pa.string()), ("source", pa.string()),
    ("position", pa.int64()), ("model", pa.string()), ("model_version", pa.string()), ("engine", pa.string()),
    ("provider", pa.string()), ("labels", LABEL_TYPE), ("result", pa.string()),
    ("preprocess_ms", pa.float64()), ("infer_ms", pa.float64()), ("postprocess_ms", pa.float64()),
])
GENERATED_FIELDS = (pa.field("generated_text", pa.string()), pa.field("generated_finish_reason", pa.string()))
"""With ``generate.enabled``: what the generative head wrote (null for a
rejected record, and for one the head could not answer: its ``result``
JSON's ``generated.error`` says why) and why it stopped (stop / length)."""
PARTITIONS = ("run_date", "workload")
TABLE_SCHEMA = pa.schema([*FILE_SCHEMA, *(pa.field(p, pa.string()) for p in PARTITIONS)])
RESULT_COLUMNS = ("id", "model", "model_version", "engine", "provider", "labels", "result", "source", "position",
                  "preprocess_ms", "infer_ms", "postprocess_ms", *PARTITIONS)
ERROR_COLUMNS = ("id", "error_code", "error_message", "source", "position", "model", "model_version", *PARTITIONS)
META_DIR = "_mmpipe"


def file_schema(generated: bool) -> pa.Schema:
    """A data file's columns: the generated-text columns only when the run generates."""
    return pa.schema([*FILE_SCHEMA, *GENERATED_FIELDS]) if generated else FILE_SCHEMA


def table_schema(generated: bool) -> pa.Schema:
    """The table's columns (data columns, then the partitions)."""
    return pa.schema([*file_schema(generated), *(pa.field(p, pa.string()) for p in PARTITIONS)])


class OutputError(RuntimeError):
    """The output cannot be written (locked by another run, unreachable, bad options)."""


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def storage_options(uri: str, fs_options: dict[str, Any]) -> dict[str, str]:
    """delta-rs storage options for the same store pyarrow opens with
    ``fs_options`` (``batch.output_filesystem``).  S3 commits use conditional
    puts (``If-None-Match``), so two commits of one version cannot both win."""
    if _is_local(uri):
        return {}
    scheme = urlparse(uri).scheme.lower()
    out: dict[str, str] = {}
    if scheme in ("s3", "s3a"):
        endpoint = fs_options.get("endpoint_override")
        if endpoint:
            http = fs_options.get("scheme", "https") == "http"
            out["AWS_ENDPOINT_URL"] = endpoint if "://" in endpoint else f"{'http' if http else 'https'}://{endpoint}"
            if http or endpoint.startswith("http://"):
                out["AWS_ALLOW_HTTP"] = "true"
        for key, name in (("access_key", "AWS_ACCESS_KEY_ID"), ("secret_key", "AWS_SECRET_ACCESS_KEY"),
                          ("session_token", "AWS_SESSION_TOKEN"), ("region", "AWS_REGION")):
            if fs_options.get(key):
                out[name] = str(fs_options[key])
        out.setdefault("AWS_REGION", "us-east-1")
        out["conditional_put"] = "etag"
        if fs_options.get("force_virtual_addressing") is False or "AWS_ENDPOINT_URL" in out:
            out["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
    return out


class RunOutput:
    """Where one run (run date + workload) writes, and its commit."""

    def __init__(self, root: str | Path, run_date: str, workload: str, fs_options: dict[str, Any] | None = None,
                 ) -> None:
        root = str(root)
        self.fs_options = dict(fs_options or {})
        try:
            self.fs, self.path = open_filesystem(root, self.fs_options)
        except ValueError as exc:
            raise OutputError(str(exc).replace("input", "output")) from None
        self.local = _is_local(root)
        self.uri = self.path if self.local else root.rstrip("/")
        self.run_date, self.workload = run_date, workload
        self.rel = f"run_date={run_date}/workload={workload}"
        self.final = f"{self.uri}/{self.rel}"
        self.data_dir = f"{self.path}/{self.rel}"
        self.marker_dir = f"{self.path}/{META_DIR}/staging/{self.rel}"
        self.summary_path = f"{self.path}/{META_DIR}/runs/{self.rel}/summary.json"
        self.delta_options = storage_options(root, self.fs_options)
        self._lock: IO[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def open(self, resume: bool) -> dict[str, dict[str, Any]]:
        """Set up the run.  Returns the done markers ``--resume`` may skip
        (none without ``resume``).  Markers outlive a commit, so resuming a
        published run keeps its shards too."""
        try:
            self.fs.create_dir(self.marker_dir, recursive=True)
            self.fs.create_dir(self.data_dir, recursive=True)
        except OSError as exc:
            raise OutputError(f"cannot write the output {self.uri}: {exc}") from None
        if self.local:
            self._lock_local()
        if not resume:
            self.fs.delete_dir_contents(self.marker_dir, missing_dir_ok=True)
        return self.done_markers()

    def _lock_local(self) -> None:
        lock = Path(self.path) / META_DIR / f".{self.run_date}-{self.workload}.lock"
        self._lock = lock.open("ab")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise OutputError(f"another job is writing this run ({self.rel}); not starting a second one") from None

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def done_markers(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.marker_dir, allow_not_found=True)):
            if not info.base_name.endswith(".json") or info.base_name.startswith("."):
                continue
            try:
                with self.fs.open_input_stream(info.path) as f:
                    marker = json.loads(f.read())
            except (ValueError, OSError):
                continue  # unreadable: the shard is redone
            out[marker["shard"]] = marker
        return out

    def write_marker(self, marker: dict[str, Any]) -> None:
        """A finished shard: its files are complete (the workers closed them)."""
        with self.fs.open_output_stream(f"{self.marker_dir}/{marker['shard']}.json") as f:
            f.write(json.dumps(marker, sort_keys=True).encode())

    def drop_shards(self, keep: set[str]) -> None:
        """Forget shards no longer among the inputs (a resumed run whose input changed)."""
        dropped = [k for k in self.done_markers() if k not in keep]
        for key in dropped:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(f"{self.marker_dir}/{key}.json")
        if dropped:
            log_event(logger, logging.WARNING, "resume_dropped_shards", run=self.rel, shards=len(dropped))

    # -- publishing ------------------------------------------------------------------------------------------
    def commit(self, markers: list[dict[str, Any]], summary: dict[str, Any], *, generated: bool = False) -> int:
        """Publish the run: one Delta commit replacing the run's partition
        with the files the markers list.  Returns the table version.
        ``generated``: the run wrote the generated-text columns; the table
        gains them (older files read them as null) and keeps them once it
        has them, so a later run without generation hides no earlier text."""
        from deltalake import CommitProperties, DeltaTable
        from deltalake.exceptions import TableNotFoundError
        from deltalake.transaction import AddAction

        now = int(time.time() * 1000)
        parts = {"run_date": self.run_date, "workload": self.workload}
        actions = [AddAction(f"{self.rel}/{f['name']}", int(f["size"]), parts, now, True,
                             json.dumps({"numRecords": int(f["rows"])}))
                   for m in markers for f in m.get("files", [])]
        try:
            table = DeltaTable(self.uri, storage_options=self.delta_options or None)
        except TableNotFoundError:
            DeltaTable.create(self.uri, schema=table_schema(generated), partition_by=list(PARTITIONS),
                              mode="ignore", storage_options=self.delta_options or None)
            table = DeltaTable(self.uri, storage_options=self.delta_options or None)
        generated = generated or GENERATED_FIELDS[0].name in table.schema().to_arrow().names
        text = json.dumps(summary, sort_keys=True)
        table.create_write_transaction(
            actions, mode="overwrite", schema=table_schema(generated), partition_by=list(PARTITIONS),
            partition_filters=[("run_date", "=", self.run_date), ("workload", "=", self.workload)],
            commit_properties=CommitProperties(custom_metadata={"mmpipe.run": self.rel, "mmpipe.summary": text}),
        )
        table.update_incremental()  # the object still names the version it read
        version = table.version()
        # A convenience copy for tools without a Delta reader; the commit is the truth.
        with contextlib.suppress(OSError):
            self.fs.create_dir(self.summary_path.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(self.summary_path) as f:
                f.write(json.dumps({**summary, "delta_version": version}, indent=2, sort_keys=True).encode())
        return version


# -- reading the output back ---------------------------------------------------------------------------------------
def _table(root: str | Path, fs_options: dict[str, Any] | None = None, version: int | None = None) -> pa.Table:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = str(root)
    if _is_local(uri):
        uri = str(Path(uri.removeprefix("file://")).resolve())
    try:
        dt = DeltaTable(uri, version=version, storage_options=storage_options(uri, fs_options or {}) or None)
    except TableNotFoundError:
        return TABLE_SCHEMA.empty_table()
    return dt.to_pyarrow_table()


def read_results(root: str | Path, fs_options: dict[str, Any] | None = None) -> pa.Table:
    """Every published result row, with ``run_date`` and ``workload`` columns
    (and the generated-text columns when the table has them)."""
    tbl = _table(root, fs_options)
    cols = [*RESULT_COLUMNS, *(f.name for f in GENERATED_FIELDS if f.name in tbl.column_names)]
    return tbl.filter(pc.is_null(tbl["error_code"])).select(cols)


def read_errors(root: str | Path, fs_options: dict[str, Any] | None = None) -> pa.Table:
    """Every published rejected record (reason codes), with ``run_date`` and ``workload``."""
    tbl = _table(root, fs_options)
    return tbl.filter(pc.is_valid(tbl["error_code"])).select(list(ERROR_COLUMNS))


def read_as_results(root: str | Path, fs_options: dict[str, Any] | None = None) -> list[Result]:
    """Every published row as a :class:`~pipeline.records.Result` (results
    and errors alike, from the ``result`` JSON the Predictor produced), so
    a tool can compare the batch job's answers with any other path's."""
    return [Result.model_validate_json(t) for t in _table(root, fs_options).column("result").to_pylist()]


def read_summary(root: str | Path, run_date: str, workload: str, fs_options: dict[str, Any] | None = None,
                 ) -> dict[str, Any]:
    """The summary of the published run, from the commit that published it."""
    from deltalake import DeltaTable

    uri = str(root)
    if _is_local(uri):
        uri = str(Path(uri.removeprefix("file://")).resolve())
    dt = DeltaTable(uri, storage_options=storage_options(uri, fs_options or {}) or None)
    rel = f"run_date={run_date}/workload={workload}"
    for commit in dt.history():
        if commit.get("mmpipe.run") == rel and "mmpipe.summary" in commit:
            return json.loads(commit["mmpipe.summary"])
    raise FileNotFoundError(f"no published run {rel} in {root}")
