"""Job metrics to a Prometheus Pushgateway at the end of a run.

A batch job is gone before Prometheus could scrape it, so it pushes: the
shared metric set's job gauges (last success time, duration, records by
outcome), grouped by job and workload so the nightly runs of different
workloads do not overwrite each other.  The records/errors counters and
stage latencies come from the workers themselves (``push_worker_metrics``:
each decode task and inference actor pushes the registry its Predictor
recorded into), not rebuilt from the summary.  ``pushadd`` (POST) keeps
the previous ``last_success`` when a failed run pushes, which is what a
"batch job has not succeeded for 26 hours" alert needs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, pushadd_to_gateway

from pipeline.log import log_event
from pipeline.metrics import get_metrics

logger = logging.getLogger(__name__)


def push_job_metrics(
    url: str, job: str, summary: dict[str, Any], *, success: bool, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Push the run's metrics; returns ``{"url", "pushed", "error"?}`` for the
    summary.  A Pushgateway that is down never fails the job: the output is
    already published by then."""
    registry = CollectorRegistry()
    m = get_metrics(registry)
    workload = summary["workload"]
    job_labels = {"workload": workload, "job": job}
    if success:
        m.job_last_success.labels(**job_labels).set(time.time())
    m.job_duration.labels(**job_labels).set(summary.get("wall_s", 0.0))
    m.job_records.labels(**job_labels, outcome="in").set(summary.get("records_in", 0))
    m.job_records.labels(**job_labels, outcome="ok").set(summary.get("results", 0))
    m.job_records.labels(**job_labels, outcome="error").set(summary.get("errors", 0))
    try:
        pushadd_to_gateway(url, job=job, registry=registry, grouping_key={"workload": workload},
                           timeout=timeout_s)
    except Exception as exc:  # URLError, timeouts, HTTP errors: reported, never fatal
        log_event(logger, logging.WARNING, "pushgateway_failed", url=url, exc_type=type(exc).__name__)
        return {"url": url, "pushed": False, "error": f"{type(exc).__name__}: {exc}"}
    log_event(logger, logging.INFO, "pushgateway_pushed", url=url, job=job, workload=workload)
    return {"url": url, "pushed": True}


def push_worker_metrics(url: str, job: str, workload: str, registry: CollectorRegistry, worker: str,
                        timeout_s: float = 5.0) -> bool:
    """Push one worker's own registry (the Predictor's records, errors by
    reason, stage latencies and batch sizes, recorded where the work ran),
    grouped by job, workload and worker so workers never overwrite each
    other; Prometheus sums them.  Never fails the work."""
    try:
        pushadd_to_gateway(url, job=job, registry=registry, grouping_key={"workload": workload, "worker": worker},
                           timeout=timeout_s)
    except Exception as exc:  # reported, never fatal
        log_event(logger, logging.WARNING, "pushgateway_failed", url=url, exc_type=type(exc).__name__)
        return False
    return True
