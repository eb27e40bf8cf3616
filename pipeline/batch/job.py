"""``mmpipe batch``: the Ray Data job, from planning to the published run.

    plan shards (driver, metadata only) -> skip shards already done (--resume)
    -> Ray Data: from_items(shards)
       -> map_batches(ShardActor) in an actor pool: each actor reads, decodes,
          infers and writes whole shards (batch.decode_in: actor, the CPU default)
       or map_batches(decode_shards) in CPU tasks -> map_batches(InferActor)
          in an actor pool (decode_in: tasks, the default for GPU actors)
    -> the driver tracks which shards' files are written, writes each shard's
       done marker -> summary -> one Delta commit -> Pushgateway

Ray Data executes streaming: shards are read, decoded and inferred a few at
a time with backpressure between stages, so memory follows the number of
shards in flight, not the size of the input.  The driver only ever holds
the result rows (labels and scores, no tensors) of shards not yet complete.

A local Ray is started for the job unless ``RAY_ADDRESS`` names a cluster
(KubeRay's RayJob sets it), or Ray is already initialised in this process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.batch.inputs import InputFormat, Shard, open_filesystem, plan_shards
from pipeline.batch.output import RunOutput
from pipeline.batch.pushgateway import push_job_metrics
from pipeline.batch.stages import PIECE_FIELDS, InferActor, ShardActor, decode_shards, settings_json
from pipeline.batch.summary import aggregate
from pipeline.config import Settings
from pipeline.errors import PackageError
from pipeline.generate import check_enabled
from pipeline.log import log_event
from pipeline.package import ModelPackage, load_package

logger = logging.getLogger(__name__)


class BatchJobError(RuntimeError):
    """The job could not finish; nothing was published (finished shards stay
    in staging for ``--resume``)."""


@dataclass
class JobOptions:
    """What one run reads and writes.  A run is identified by its run date
    and the package's workload: rerunning the same pair replaces it."""

    input: str
    output: str
    run_date: str | None = None
    resume: bool = False
    input_format: InputFormat = "auto"
    package: str | None = None
    progress: bool | None = None  # None: the config's batch.progress, on a terminal only


def _run_date(value: str | None) -> str:
    if value is None:
        return dt.datetime.now(dt.UTC).date().isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"run date {value!r} is not a date (YYYY-MM-DD)") from None


def _ray_init(settings: Settings) -> tuple[bool, str | None, str]:
    """Start (or join) Ray.  Returns (we started it, our temp dir, address)."""
    import ray

    if ray.is_initialized():
        return False, None, "existing"
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    address = os.environ.get("RAY_ADDRESS")
    # Workers' own output reaches the driver only at DEBUG: forwarding it
    # costs a log monitor and the driver CPU that the job's stages need, and
    # every record-level problem already comes back as an error row.
    to_driver = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=to_driver)
        return True, None, address
    # A private temp dir: never attach to someone else's local cluster, and
    # keep socket paths short.
    tmp = tempfile.mkdtemp(prefix="mmray-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")
    ray.init(num_cpus=settings.batch.ray_num_cpus or os.cpu_count() or 1, include_dashboard=False,
             _temp_dir=tmp, logging_level=logging.WARNING, log_to_driver=to_driver)
    return True, tmp, "local"


_TERMINAL: Any = None
"""The terminal's stderr while :func:`library_output_to_log` sends fd 2 to the log file."""


def job_log_path() -> str:
    """The job's log file: ``MMPIPE_BATCH_LOG``, else one per process in the temp dir."""
    return os.environ.get("MMPIPE_BATCH_LOG") or os.path.join(tempfile.gettempdir(), f"mmpipe-batch-{os.getpid()}.log")


@contextlib.contextmanager
def library_output_to_log() -> Iterator[str | None]:
    """Other libraries' chatter to the job's log file, not the terminal.

    Ray's token-authentication warning, the core worker's native ``E``
    lines (C++, written straight to file descriptor 2), Ray Data's notices
    and forwarded worker output cannot all be configured away at their
    source, so while the job runs descriptor 2 points at the log file; the
    progress bar keeps the terminal (a duplicate of the old descriptor).
    At ``--log-level DEBUG`` nothing is redirected.  Yields the log path
    (None when not redirected)."""
    global _TERMINAL
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG or _TERMINAL is not None:
        yield None
        return
    path = job_log_path()
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _TERMINAL = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield path
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _TERMINAL.close()
        _TERMINAL = None


RAY_DATA_THREADS = ("iter_threaded", "map_tp_", "StreamingExecutor-")
"""Name prefixes of Ray Data's block-iterator and executor threads (its
``Prefetcher`` parks on a condition, away from Ray, once iteration stops)."""


def quiesce_ray_data(timeout_s: float = 15.0) -> list[str]:
    """Wait (``timeout_s`` at most, all together) for Ray Data's iterator
    and executor threads to end; returns the names of those still running.

    When a job fails, its block iterator stops but Ray Data does not join
    its prefetching threads (it says so in ``make_async_gen``); one still in
    a ``ray.get`` when Ray shuts down makes the core worker end the whole
    process with exit code 1 before the failure is reported, so the user
    would see nothing.  After a job that finished, they are already gone."""
    deadline = time.monotonic() + timeout_s
    for t in threading.enumerate():
        if t is not threading.current_thread() and t.name.startswith(RAY_DATA_THREADS):
            t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if t.is_alive() and t.name.startswith(RAY_DATA_THREADS)]


@contextlib.contextmanager
def ray_session(settings: Settings) -> Iterator[str]:
    """Ray for one or more jobs: the cluster named by ``RAY_ADDRESS``, the
    one already initialised in this process, or a local one started here
    (and shut down on exit).  Yields where the jobs run."""
    import ray

    with library_output_to_log():
        started, tmp, address = _ray_init(settings)
        try:
            yield address
        finally:
            if started:
                quiesce_ray_data()
                ray.shutdown()
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)


class _Collector:
    """Tracks which records of each shard are in files (pieces may arrive in
    any order, or twice after a retried call) and writes a shard's done
    marker once pieces cover all its records.  Holds counts, never rows."""

    def __init__(self, out: RunOutput, shards: dict[str, Shard]) -> None:
        self.out, self.shards = out, shards
        self.pieces: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.covered: dict[str, set[int]] = defaultdict(set)
        self.finished: list[str] = []
        self.records = 0
        self.errors = 0
        self.engine: str | None = None  # "name (provider)" as the actors report it
        self.actors: int | None = None  # the actor pool's minimum size

    def add(self, batch: dict[str, Any]) -> int:
        """Take the pieces one inference call wrote; returns how many shards they completed."""
        done = 0
        for i in range(len(batch["shard"])):
            piece = {f: _plain(batch[f][i]) for f in PIECE_FIELDS}
            key = piece["shard"]
            if key not in self.shards or key in self.finished:
                continue
            self.engine = self.engine or piece["engine"]
            seqs = set(range(piece["first_seq"], piece["last_seq"] + 1)) if piece["rows"] else set()
            if seqs & self.covered[key]:
                continue  # a retried call's repeat: its file stays unreferenced
            self.covered[key] |= seqs
            self.pieces[key].append(piece)
            if len(self.covered[key]) == piece["total"]:
                self._finish(key)
                done += 1
        return done

    def _finish(self, key: str) -> None:
        pieces = sorted(self.pieces.pop(key), key=lambda p: p["first_seq"])
        shard = self.shards[key]
        errors: Counter[str] = Counter()
        labels: dict[str, Counter[str]] = defaultdict(Counter)
        for p in pieces:
            errors.update(json.loads(p["errors"]))
            for head, counts in json.loads(p["labels"]).items():
                labels[head].update(counts)
        marker = {
            "shard": key, "source": shard.path, "kind": shard.kind, "range": [shard.start, shard.end],
            "records": pieces[0]["total"], "ok": sum(p["ok"] for p in pieces),
            "errors": dict(sorted(errors.items())), "labels": {h: dict(c) for h, c in sorted(labels.items())},
            "decode_s": round(pieces[0]["decode_s"], 4), "infer_s": round(sum(p["infer_s"] for p in pieces), 4),
            "files": [{"name": p["name"], "size": p["size"], "rows": p["rows"]} for p in pieces if p["rows"]],
            "nodes": {"decode": sorted({p["decode_node"] for p in pieces}),
                      "infer": sorted({p["infer_node"] for p in pieces})},
        }
        self.out.write_marker(marker)
        self.covered.pop(key, None)
        self.finished.append(key)
        self.records += marker["records"]
        self.errors += sum(errors.values())


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="shard", desc="mmpipe batch", file=_TERMINAL or sys.stderr, dynamic_ncols=True)


def _execute(settings: Settings, package: ModelPackage, input_uri: str, todo: list[Shard], out: RunOutput,
             progress: bool) -> tuple[_Collector, dict[str, float], str]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    cfg = settings.batch
    t0 = time.perf_counter()
    with ray_session(settings) as address:
        times = {"ray_start": time.perf_counter() - t0}
        if cfg.num_gpus > 0 and not ray.cluster_resources().get("GPU"):
            msg = f"batch.num_gpus={cfg.num_gpus} but the Ray cluster has no GPUs"
            if address in ("local", "existing"):
                raise BatchJobError(msg + " (set batch.num_gpus: 0 on CPU machines)")
            log_event(logger, logging.WARNING, "no_gpus_yet", detail=msg)
        cpus = ray.cluster_resources().get("CPU", 0)
        mode = cfg.decode_mode()
        actors = cfg.actors(cpus)
        if cfg.concurrency is None:  # no more actors than shards to give them
            actors = max(1, min(actors, len(todo)))
        top = max(actors, cfg.max_concurrency or 0)
        need = top * cfg.actor_num_cpus + (cfg.num_cpus if mode == "tasks" else 0)
        if need > cpus:
            # Actors that cannot all be placed (or that leave no CPU for a decode task) hang, not slow, the job.
            msg = (f"{top} inference actors x batch.actor_num_cpus={cfg.actor_num_cpus}"
                   + (f" + one decode task (batch.num_cpus={cfg.num_cpus})" if mode == "tasks" else "")
                   + f" need {need:g} CPUs; the Ray cluster has {cpus:g}")
            if address in ("local", "existing"):
                raise BatchJobError(msg + " (lower batch.concurrency or batch.actor_num_cpus)")
            log_event(logger, logging.WARNING, "cluster_too_small_yet", detail=msg)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts shards and records; Ray's would interleave
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = False
        sj = settings_json(settings)
        common = {"settings_json": sj, "package_dir": str(package.root), "digest": package.digest}
        ds = ray.data.from_items([s.row() for s in todo], override_num_blocks=len(todo))
        pool = ActorPoolStrategy(min_size=actors, max_size=top)
        out_kw = {"out_dir": out.data_dir, "out_uri": out.uri}
        if mode == "actor":
            # Each actor runs whole shards: read, decode, infer, write.
            ds = ds.map_batches(ShardActor, batch_size=1, batch_format="numpy", compute=pool,
                                num_cpus=cfg.actor_num_cpus, fn_constructor_kwargs={**common, **out_kw,
                                                                                     "input_uri": input_uri})
        else:
            # One shard per decode call and one block per shard: few, large
            # blocks.  Decode tasks reserve memory for a shard's tensors; that
            # also keeps Ray Data from fusing decode into the inference actors
            # (it fuses stages with equal resource requests), which would put
            # decoding on GPU nodes.
            ds = ds.map_batches(decode_shards, batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus,
                                memory=cfg.decode_memory_mb * 2**20, fn_kwargs={**common, "input_uri": input_uri})
            # batch_size=None: an actor takes decoded blocks whole and writes each
            # shard's rows as one file (a block Ray split is written in pieces).
            ds = ds.map_batches(InferActor, batch_size=None, batch_format="numpy", compute=pool,
                                num_cpus=cfg.actor_num_cpus, num_gpus=cfg.num_gpus or None,
                                fn_constructor_kwargs={**common, **out_kw})
        collector = _Collector(out, {s.key: s for s in todo})
        collector.actors = actors
        bar = _progress(progress, len(todo))
        t1 = time.perf_counter()
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data configures itself on first use
        try:
            for block in ds.iter_batches(batch_format="numpy", batch_size=None):
                done = collector.add(block)
                if bar is not None and done:
                    bar.update(done)
                    bar.set_postfix(records=collector.records, errors=collector.errors)
        finally:
            if bar is not None:
                bar.close()
        times["pipeline"] = time.perf_counter() - t1
        missing = len(todo) - len(collector.finished)
        if missing:
            raise BatchJobError(f"{missing} of {len(todo)} shards did not complete; nothing was published")
        return collector, times, address


def run_batch(settings: Settings, opts: JobOptions) -> dict[str, Any]:
    """Run the job; returns the summary (also written beside the output).
    Raises BatchJobError (or InputError/OutputError/PackageError) without
    publishing anything when the run cannot finish."""
    t_start = time.perf_counter()
    package_dir = opts.package or (str(settings.model_package) if settings.model_package else None)
    if package_dir is None:
        raise PackageError("no model package given: pass --package or set model_package in the config")
    package = load_package(package_dir)  # verifies checksums before any worker starts
    check_enabled(package, settings.generate)  # generate.enabled without a generative head: refused now
    workload = package.spec.name
    run_date = _run_date(opts.run_date)
    cfg = settings.batch
    fs, path = open_filesystem(opts.input, cfg.filesystem)
    shards = plan_shards(fs, path, fmt=opts.input_format, shard_bytes=cfg.shard_bytes, shard_rows=cfg.shard_rows)
    input_uri = opts.input if "://" in opts.input else path
    t_plan = time.perf_counter() - t_start
    out = RunOutput(opts.output, run_date, workload, cfg.output_options())
    progress = (cfg.progress and (_TERMINAL or sys.stderr).isatty()) if opts.progress is None else opts.progress
    summary: dict[str, Any] = {"workload": workload, "run_date": run_date, "model": package.name}
    try:
        done = out.open(opts.resume)
        keys = {s.key for s in shards}
        if opts.resume:
            out.drop_shards(keep=keys)
        todo = [s for s in shards if s.key not in done]
        log_event(logger, logging.INFO, "batch_planned", workload=workload, run_date=run_date, shards=len(shards),
                  todo=len(todo), resume=opts.resume)
        times: dict[str, float] = {"plan": t_plan}
        attempt_records, address, engine_used, actors_used = 0, "none (nothing to do)", None, None
        if todo:
            collector, run_times, address = _execute(settings, package, input_uri, todo, out, progress)
            times.update(run_times)
            attempt_records, engine_used, actors_used = collector.records, collector.engine, collector.actors
        markers = [m for k, m in out.done_markers().items() if k in keys]
        if len(markers) != len(shards):
            raise BatchJobError(f"only {len(markers)} of {len(shards)} shards are done; nothing was published")
        agg = aggregate(markers)
        wall = time.perf_counter() - t_start
        summary.update({
            "run_id": f"{run_date}/{workload}",
            "model_version": package.version,
            "engine": engine_used or settings.engine.kind,
            "input": opts.input,
            "output": out.final,
            "table": out.uri,
            "records_in": agg["records_in"],
            "results": agg["results"],
            "errors": agg["errors"],
            "errors_by_reason": agg["errors_by_reason"],
            "counts_match": agg["records_in"] == agg["results"] + agg["errors"],
            "shards": len(shards),
            "shards_skipped": len(shards) - len(todo),
            "records_this_attempt": attempt_records,
            "wall_s": round(wall, 3),
            "records_per_s": round(attempt_records / wall, 2) if wall > 0 else 0.0,
            "stage_seconds": {k: round(v, 3) for k, v in
                              {**times, "decode": agg["decode_s"], "infer": agg["infer_s"]}.items()},
            "labels": agg["labels"],
            "nodes": agg["nodes"],
            "ray": {"address": address, "decode_in": cfg.decode_mode(), "concurrency": actors_used,
                    "max_concurrency": cfg.max_concurrency,
                    "num_gpus": cfg.num_gpus, "batch_size": cfg.batch_size},
        })
        if not summary["counts_match"]:
            raise BatchJobError("records in != results + errors; nothing was published")
        t_commit = time.perf_counter()
        summary["delta_version"] = out.commit(markers, summary, generated=settings.generate.enabled)
        summary["stage_seconds"]["commit"] = round(time.perf_counter() - t_commit, 3)
        log_event(logger, logging.INFO, "batch_published", workload=workload, run_date=run_date,
                  records=agg["records_in"], results=agg["results"], errors=agg["errors"],
                  version=summary["delta_version"])
    except BaseException:
        if cfg.pushgateway_url:  # duration and counts so far; last_success keeps its old value
            summary.setdefault("wall_s", round(time.perf_counter() - t_start, 3))
            push_job_metrics(cfg.pushgateway_url, cfg.pushgateway_job, summary, success=False)
        raise
    finally:
        out.close()
    if cfg.pushgateway_url:
        summary["pushgateway"] = push_job_metrics(cfg.pushgateway_url, cfg.pushgateway_job, summary, success=True)
    return summary
