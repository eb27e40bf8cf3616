"""The shared Prometheus metric set.

Every path (CLI, batch, stream, online) records into the same metric names
with the same labels (``path``, ``workload``, ``model`` and, where it
applies, ``outcome``, ``reason`` or ``stage``), so one dashboard and one set
of alerts covers them all.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

NAMESPACE = "mmpipe"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BASE = ("path", "workload", "model")


class Metrics:
    """All metrics of mmpipe, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.records = Counter(
            "records", "Records processed, by outcome (ok or error).",
            [*BASE, "outcome"], namespace=NAMESPACE, registry=registry,
        )
        self.errors = Counter(
            "record_errors", "Records rejected, by reason code.",
            [*BASE, "reason"], namespace=NAMESPACE, registry=registry,
        )
        self.stage_seconds = Histogram(
            "stage_seconds", "Time per pipeline stage (preprocess, infer, postprocess) per batch.",
            [*BASE, "stage"], namespace=NAMESPACE, registry=registry, buckets=_LATENCY_BUCKETS,
        )
        self.request_seconds = Histogram(
            "request_seconds", "End-to-end latency of a request, batch or micro-batch.",
            BASE, namespace=NAMESPACE, registry=registry, buckets=_LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "batch_size", "Records per engine call.",
            BASE, namespace=NAMESPACE, registry=registry, buckets=_BATCH_BUCKETS,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Records waiting to be processed.",
            BASE, namespace=NAMESPACE, registry=registry,
        )
        self.consumer_lag = Gauge(
            "consumer_lag", "Kafka consumer lag in records, per partition.",
            [*BASE, "topic", "partition"], namespace=NAMESPACE, registry=registry,
        )
        self.ignored_modalities = Counter(
            "ignored_modalities", "Record fields of a modality the model does not take, dropped undecoded "
            "(limits.extra_modalities: ignore).",
            [*BASE, "modality"], namespace=NAMESPACE, registry=registry,
        )
        self.model_info = Gauge(
            "model_info", "Loaded model (value is always 1).",
            [*BASE, "version", "engine", "provider"], namespace=NAMESPACE, registry=registry,
        )
        # Stream (Kafka) path.  Records in/out/error use ``records`` and
        # ``record_errors`` with path="stream"; these are what only a stream has.
        self.dlq_records = Counter(
            "dlq_records", "Records sent to the dead-letter topic, by reason code.",
            [*BASE, "reason"], namespace=NAMESPACE, registry=registry,
        )
        self.end_to_end_seconds = Histogram(
            "end_to_end_seconds", "From the input record's timestamp to its result being acknowledged.",
            BASE, namespace=NAMESPACE, registry=registry, buckets=_LATENCY_BUCKETS,
        )
        self.commit_failures = Counter(
            "commit_failures", "Offset commits (or transactions) that failed.",
            BASE, namespace=NAMESPACE, registry=registry,
        )
        self.rebalances = Counter(
            "rebalances", "Consumer-group rebalances seen by this member, by kind (assigned or revoked).",
            [*BASE, "kind"], namespace=NAMESPACE, registry=registry,
        )
        self.paused_partitions = Gauge(
            "paused_partitions", "Partitions paused for backpressure.",
            BASE, namespace=NAMESPACE, registry=registry,
        )
        self.stream_client_info = Gauge(
            "stream_client_info", "The stream's Kafka client (value is always 1): its version and the CRC32C "
            "implementation it checks fetched batches with (c, or python: slow).",
            [*BASE, "client_version", "crc32c"], namespace=NAMESPACE, registry=registry,
        )
        # Batch (Ray Data) path: what a Pushgateway receives at the end of a run.
        self.job_last_success = Gauge(
            "job_last_success_timestamp_seconds", "Unix time the batch job last finished successfully.",
            ["workload", "job"], namespace=NAMESPACE, registry=registry,
        )
        self.job_duration = Gauge(
            "job_duration_seconds", "Wall time of the last batch job run.",
            ["workload", "job"], namespace=NAMESPACE, registry=registry,
        )
        self.job_records = Gauge(
            "job_records", "Records of the last batch job run, by outcome (in, ok, error).",
            ["workload", "job", "outcome"], namespace=NAMESPACE, registry=registry,
        )


_lock = threading.Lock()
_by_registry: dict[int, Metrics] = {}


def get_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """The Metrics of ``registry`` (the process default when omitted).

    prometheus_client refuses to register a name twice, so every component
    of a process shares one Metrics object per registry."""
    reg = registry or REGISTRY
    with _lock:
        m = _by_registry.get(id(reg))
        if m is None:
            m = Metrics(reg)
            _by_registry[id(reg)] = m
        return m
