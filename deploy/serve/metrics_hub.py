"""mmpipe metrics of every replica of an application, on the ingress's /metrics.

The shared metric set (``pipeline.metrics``) is recorded where the work
happens: in the model replicas, which are separate processes, possibly on
other nodes.  Each replica keeps its own registry and pushes a snapshot of
it to one small named actor per application (the hub) when something
changed, at most every ``PUSH_INTERVAL_S``, and as a heartbeat otherwise.
The ingress's ``/metrics`` merges the live snapshots, adding a ``replica``
label so series from different replicas never collide (Prometheus sums
them in queries).  Snapshots not refreshed within ``STALE_S`` (a replica
that died without saying goodbye) are dropped.

Why not prometheus_client's multiprocess mode: it shares files, which only
works for processes on one node.  Why not Ray's own metrics: they would be
renamed (``ray_`` prefix) and served on another port, breaking "one metric
set, one dashboard" with the batch and stream paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from pipeline.log import log_event

logger = logging.getLogger(__name__)

NAMESPACE = "mmpipe"
PUSH_INTERVAL_S = 0.5
HEARTBEAT_S = 10.0
STALE_S = 60.0
REPLICA_LABEL = "replica"


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsHub:
    """Latest metric snapshot per replica (a list of prometheus ``Metric``)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, tuple[float, list[Metric]]] = {}

    def push(self, replica: str, families: list[Metric]) -> None:
        self._snapshots[replica] = (time.monotonic(), families)

    def drop(self, replica: str) -> None:
        self._snapshots.pop(replica, None)

    def snapshot(self, max_age_s: float = STALE_S) -> dict[str, list[Metric]]:
        now = time.monotonic()
        for key in [k for k, (t, _) in self._snapshots.items() if now - t > max_age_s]:
            del self._snapshots[key]
        return {k: fams for k, (_, fams) in self._snapshots.items()}


def hub_name(app_name: str) -> str:
    return f"metrics:{app_name}"


def get_hub(app_name: str) -> Any:
    """The application's hub, created on first use.  Detached so it outlives
    whichever replica happened to create it; one per application name, so a
    redeploy reuses it."""
    return MetricsHub.options(
        name=hub_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
    ).remote()


class Publisher:
    """Pushes one replica's registry to the hub from a background task.

    ``mark()`` is cheap (called after every batch); the task pushes at most
    every ``PUSH_INTERVAL_S`` while there are changes and every
    ``HEARTBEAT_S`` regardless, so the hub knows the replica is alive."""

    def __init__(self, registry: CollectorRegistry, app_name: str, replica: str) -> None:
        self.registry = registry
        self.app_name = app_name
        self.replica = replica
        self._dirty = True
        self._last = 0.0
        self._retry_at = 0.0
        self._task: asyncio.Task | None = None
        self._hub: Any = None

    def mark(self) -> None:
        self._dirty = True

    def ensure_started(self) -> None:
        """Start the push loop on the running event loop.  Serve runs replica
        constructors on the user-code loop's thread; should a version not,
        the first request starts it."""
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._task = loop.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            now = time.monotonic()
            due = (self._dirty and now - self._last >= PUSH_INTERVAL_S) or now - self._last >= HEARTBEAT_S
            if due and now >= self._retry_at:
                self._dirty = False
                self._last = now
                await self._push()
            await asyncio.sleep(PUSH_INTERVAL_S)

    async def _push(self) -> None:
        families = list(self.registry.collect())
        try:
            if self._hub is None:
                self._hub = await asyncio.to_thread(get_hub, self.app_name)
            await self._hub.push.remote(self.replica, families)
        except Exception as exc:  # the hub restarts; metrics must never fail serving
            # Retry after a heartbeat, not every tick: one warning per
            # HEARTBEAT_S while the hub is away, however busy the replica.
            self._hub = None
            self._dirty = True
            self._retry_at = time.monotonic() + HEARTBEAT_S
            log_event(logger, logging.WARNING, "metrics_push_failed", exc_type=type(exc).__name__)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._hub is not None:
            with contextlib.suppress(Exception):  # best effort at shutdown; stale entries expire anyway
                self._hub.drop.remote(self.replica)


def merge(snapshots: Mapping[str, Iterable[Metric]]) -> list[Metric]:
    """One family per metric name, each sample labelled with its replica."""
    merged: dict[str, Metric] = {}
    for replica, families in sorted(snapshots.items()):
        for fam in families:
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, REPLICA_LABEL: replica}, s.value, s.timestamp, s.exemplar)
    return list(merged.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def exposition(snapshots: Mapping[str, Iterable[Metric]]) -> bytes:
    """Prometheus text format of the merged snapshots."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merge(snapshots)))  # type: ignore[arg-type]
    return generate_latest(registry)
