"""``mmpipe batch``: argument parsing and the printed summary."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

from pipeline.log import log_event

logger = logging.getLogger("mmpipe")

EPILOG = """\
examples:
  mmpipe batch --config batch.yaml --input data/retail/records.jsonl --output tags/
  mmpipe batch --package packages/retail --input s3://catalogue/manifests/ --output /mnt/tags \\
               --run-date 2026-05-01
  mmpipe batch --package packages/media --input /archive/thumbnails/ --output tags/   # a media folder
  mmpipe batch --config batch.yaml --input records.jsonl --output tags/ --resume      # after a crash
  RAY_ADDRESS=http://head:8265 mmpipe batch --config batch.yaml --input s3://... --output s3://...
      # a cluster's job API: the command runs there as a Ray job (what the Helm chart does)

inputs: a JSONL or Parquet manifest (one record per line/row: id, workload, text, image,
audio, video, tabular, metadata; media inline or as URIs), a folder of manifests, or a
folder of media files (files sharing a stem form one record: a.png + a.txt + a.wav).
Local paths, file://, and s3:// gs:// hdfs:// through pyarrow (options: batch.filesystem).

output: a Delta Lake table (local directory, s3://, gs://; batch.output_filesystem), partitioned
by run_date and workload, one row per record: results (labels, scores, full result JSON) and
rejected records (error_code, error_message).  Read it with deltalake, DuckDB, Spark, Trino.
A run (run date + workload) is published in one Delta commit: a rerun replaces it whole, and
a crash leaves the previous run (or nothing) visible.  --resume skips shards already done.
Ray's own messages go to the job's log file (MMPIPE_BATCH_LOG); --log-level DEBUG shows them.

exit codes: 0 published; 1 the job failed (nothing published); 2 bad config, input or package."""


def cmd_batch(args: argparse.Namespace) -> int:
    from pipeline.batch.inputs import InputError
    from pipeline.batch.job import BatchJobError, JobOptions, run_batch
    from pipeline.batch.output import OutputError
    from pipeline.batch.submit import is_job_api, submit
    from pipeline.batch.summary import print_table
    from pipeline.config import load_settings
    from pipeline.errors import ConfigError, PackageError

    address = os.environ.get("RAY_ADDRESS")
    if is_job_api(address) and "batch" in sys.argv:
        # The cluster's job API: run this very command there, as a Ray job.
        return submit(address, sys.argv[sys.argv.index("batch") + 1:], args.config)  # type: ignore[arg-type]
    settings = load_settings(args.config)
    if args.engine:
        settings.engine.kind = args.engine
    if args.batch_size:
        settings.batch.batch_size = args.batch_size
    if args.concurrency:
        settings.batch.concurrency = args.concurrency
    opts = JobOptions(input=args.input, output=args.output, run_date=args.run_date, resume=args.resume,
                      input_format=args.input_format, package=args.package,
                      progress=False if args.no_progress else None)
    from ray.exceptions import RayError

    try:
        summary = run_batch(settings, opts)
    except RayError as exc:  # first: a task's error re-raised by Ray also subclasses the task's exception type
        log_event(logger, logging.ERROR, "batch_failed", exc_type=type(exc).__name__)
        if _disk_full(exc):
            return _report_full(args.output, errno.ENOSPC)
        print(f"error: the batch job failed in Ray ({type(exc).__name__}: {str(exc)[:500]})\n"
              "nothing was published; finished shards are kept: rerun with --resume to continue", file=sys.stderr)
        return 1
    except (InputError, OutputError, PackageError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BatchJobError as exc:
        print(f"error: the batch job failed: {exc}\n"
              "finished shards are kept; rerun with --resume to continue", file=sys.stderr)
        return 1
    except Exception as exc:  # a Ray task that kept failing, a lost cluster: report, never a traceback dump
        log_event(logger, logging.ERROR, "batch_failed", exc_type=type(exc).__name__)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _report_full(args.output, exc.errno)
        print(f"error: the batch job failed ({type(exc).__name__}: {str(exc)[:500]})\n"
              "nothing was published; finished shards are kept: rerun with --resume to continue", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_table([summary])
        print(f"\npublished {summary['output']} (Delta table {summary['table']}, version {summary['delta_version']})")
        push = summary.get("pushgateway")
        if push:
            print(f"pushgateway {push['url']}: " + ("pushed" if push["pushed"] else f"NOT pushed ({push['error']})"))
    return 0


def _disk_full(exc: BaseException) -> bool:
    """An inference actor's write failed for lack of space (Ray wraps the
    worker's OSError; pyarrow names the errno in the message)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return False


def _report_full(output: str, code: int) -> int:
    # Said plainly: the fix is space (or quota), not a code change.
    print(f"error: the output filesystem is full ({errno.errorcode[code]}: {os.strerror(code)}) while writing under "
          f"{output}\nnothing was published; finished shards are kept: free space (or raise the quota) and rerun "
          "with --resume", file=sys.stderr)
    return 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "batch", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="tag files of records (or media folders) with a Ray Data job, to Parquet",
        description="The nightly tagging job.  Reads records and runs the model in a Ray Data actor pool\n"
        "(on CPUs, by default, one actor per CPU, each reading, decoding, inferring and writing\n"
        "whole shards; with batch.num_gpus, decoding runs in CPU tasks that feed the GPU actors),\n"
        "and writes Parquet partitioned by run date and workload.  Every\n"
        "input record ends up as a result row or an error row with its reason code, and the\n"
        "summary checks records in = results + errors.  Runs on a local Ray, or on the cluster\n"
        "named by RAY_ADDRESS.  Metrics go to a Pushgateway when batch.pushgateway_url is set.",
        epilog=EPILOG,
    )
    b.add_argument("--config", "-c", metavar="YAML",
                   help="settings file (see README 'Configuration', section batch:); MMPIPE__BATCH__KEY env vars "
                   "override it")
    b.add_argument("--input", "-i", required=True, help="JSONL/Parquet file, folder of them, or folder of media")
    b.add_argument("--output", "-o", required=True, help="output Delta table: a directory or s3:// gs:// URI")
    b.add_argument("--package", help="model package directory (or model_package in the config)")
    b.add_argument("--run-date", help="the run's date, YYYY-MM-DD (default: today, UTC); with the workload "
                   "it names the run a rerun replaces")
    b.add_argument("--resume", action="store_true",
                   help="keep shards already done by an interrupted (or published) run of this date and only "
                   "process the rest")
    b.add_argument("--input-format", choices=["auto", "jsonl", "parquet", "media"], default="auto",
                   help="auto: by file suffix; a folder without .jsonl/.parquet files is a media folder")
    b.add_argument("--engine", choices=["auto", "onnxruntime", "triton", "torch"], help="override engine.kind")
    b.add_argument("--batch-size", type=int, help="override batch.batch_size (records per engine call)")
    b.add_argument("--concurrency", type=int, help="override batch.concurrency (inference actors; default: one per CPU "
                   "on CPU clusters)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    b.set_defaults(func=cmd_batch)
