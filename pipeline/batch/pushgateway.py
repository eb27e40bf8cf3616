"""Job metrics to a Prometheus Pushgateway at the end of a run.

A batch job is gone before Prometheus could scrape it, so it pushes: the
shared metric set's job gauges (last success time, duration, records by
outcome) and the records/errors counters with ``path="batch"``, in a
registry of their own, grouped by job and workload so the nightly runs of
different workloads do not overwrite each other.  ``pushadd`` (POST) keeps
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
    workload, model = summary["workload"], summary.get("model", "")
    job_labels = {"workload": workload, "job": job}
    if success:
        m.job_last_success.labels(**job_labels).set(time.time())
    m.job_duration.labels(**job_labels).set(summary.get("wall_s", 0.0))
    m.job_records.labels(**job_labels, outcome="in").set(summary.get("records_in", 0))
    m.job_records.labels(**job_labels, outcome="ok").set(summary.get("results", 0))
    m.job_records.labels(**job_labels, outcome="error").set(summary.get("errors", 0))
    base = {"path": "batch", "workload": workload, "model": model}
    m.records.labels(**base, outcome="ok").inc(summary.get("results", 0))
    m.records.labels(**base, outcome="error").inc(summary.get("errors", 0))
    for reason, n in summary.get("errors_by_reason", {}).items():
        m.errors.labels(**base, reason=reason).inc(n)
    try:
        pushadd_to_gateway(url, job=job, registry=registry, grouping_key={"workload": workload},
                           timeout=timeout_s)
    except Exception as exc:  # URLError, timeouts, HTTP errors: reported, never fatal
        log_event(logger, logging.WARNING, "pushgateway_failed", url=url, exc_type=type(exc).__name__)
        return {"url": url, "pushed": False, "error": f"{type(exc).__name__}: {exc}"}
    log_event(logger, logging.INFO, "pushgateway_pushed", url=url, job=job, workload=workload)
    return {"url": url, "pushed": True}
