"""Helpers for tests that drive the stream consumer against a real Kafka broker.

Shared by the stream tests (tests/integration/test_stream.py) and the fault
suite (tests/faults/): starting a broker, making topics, producing records,
reading topics back, running a consumer in this process or ``mmpipe stream``
as a subprocess (for ``kill -9``, SIGTERM and restarts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from pipeline.config import load_settings
from pipeline.engines import Engine, create_engine
from pipeline.metrics import get_metrics
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import json_safe
from pipeline.stream.consumer import StreamConsumer
from pipeline.tooling import sample_data
from tests.integration.kafka_broker import KafkaBroker, KafkaCluster, KafkaUnavailable

REPO = Path(__file__).resolve().parents[2]


def start_broker(root: Path) -> KafkaBroker:
    """A started broker in ``root``, or the test fails saying why it could not start."""
    try:
        broker = KafkaBroker(root)
        broker.start()
    except KafkaUnavailable as exc:
        pytest.fail(f"the Apache Kafka broker could not be started: {exc}")
    return broker


def start_cluster(root: Path) -> KafkaCluster:
    """A started three-node cluster in ``root``, or the test fails saying why."""
    try:
        cluster = KafkaCluster(root)
        cluster.start()
    except KafkaUnavailable as exc:
        pytest.fail(f"the Apache Kafka cluster could not be started: {exc}")
    return cluster


def good_records(workload: str, n: int, seed: int, prefix: str) -> list[dict]:
    recs = [json_safe(s.record) for s in sample_data.generate(workload, n, seed=seed, missing_rate=0.3)]
    return [{**r, "id": f"{prefix}-{i}"} for i, r in enumerate(recs)]


def topics(broker: KafkaBroker, partitions: int = 2) -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    names = (f"in-{tag}", f"out-{tag}", f"dlq-{tag}")
    broker.create_topics([names[0]], partitions)
    broker.create_topics(list(names[1:]), 1)
    return names


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes | None] | None = None,
            delay_s: float = 0.0) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for i, v in enumerate(values):
        p.send(topic, value=v, key=keys[i] if keys else None)
        if delay_s:
            time.sleep(delay_s)
    p.flush()
    p.close()


class Sender(threading.Thread):
    """Produces keyed records in a thread, paced by ``delay_s``, and keeps
    the keys the broker acknowledged (``acked``) or refused (``failed``).
    Idempotent with generous timeouts, so it rides out a broker restart
    without duplicating or dropping input."""

    def __init__(self, bootstrap: str, topic: str, records: list[tuple[str, bytes]], *, delay_s: float = 0.0,
                 delivery_timeout_ms: int = 180_000) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.records, self.delay_s = bootstrap, topic, records, delay_s
        self.delivery_timeout_ms = delivery_timeout_ms
        self.acked: list[str] = []
        self.failed: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            p = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, enable_idempotence=True,
                              delivery_timeout_ms=self.delivery_timeout_ms, request_timeout_ms=10_000,
                              max_block_ms=self.delivery_timeout_ms)
            for key, value in self.records:
                fut = p.send(self.topic, key=key.encode(), value=value)
                fut.add_callback(lambda _md, k=key: self.acked.append(k))
                fut.add_errback(lambda _exc, k=key: self.failed.append(k))
                if self.delay_s:
                    time.sleep(self.delay_s)
            p.flush(timeout=self.delivery_timeout_ms / 1000 + 10)
            p.close(timeout=10)
        except BaseException as exc:  # reported by the test that reads .error
            self.error = exc


class Reader:
    """Reads topics from the beginning and keeps everything it saw."""

    def __init__(self, bootstrap: str, *topic_names: str, read_committed: bool = False) -> None:
        self.consumer = KafkaConsumer(
            *topic_names, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
            enable_auto_commit=False, isolation_level="read_committed" if read_committed else "read_uncommitted",
        )
        self.messages: list[Any] = []

    def wait(self, done: Callable[[list[Any]], bool], timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while not done(self.messages) and time.monotonic() < deadline:
            for msgs in self.consumer.poll(timeout_ms=500).values():
                self.messages.extend(msgs)
        return self.messages

    def of(self, topic: str) -> list[Any]:
        return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.consumer.close()


def ids_of(msgs: list[Any]) -> list[str]:
    return [m.key.decode() for m in msgs]


def settings_for(broker: KafkaBroker | KafkaCluster, package: Path, names: tuple[str, str, str], **stream: Any) -> dict:
    return {
        "model_package": str(package),
        "engine": {"kind": "onnxruntime", "threads": 1},
        "stream": {"bootstrap_servers": broker.bootstrap.split(","), "group_id": f"g-{names[0]}",
                   "input_topics": [names[0]], "output_topic": names[1], "dlq_topic": names[2],
                   "max_batch_records": 8, "max_wait_ms": 20, "session_timeout_ms": 6000, **stream},
    }


def run_inprocess(cfg: dict, tmp: Path, *, expect: int | None = None, idle_s: float = 30.0,
                  env: dict[str, str] | None = None, wrap_engine: Callable[[Engine], Engine] | None = None,
                  on_start: Callable[[StreamConsumer], None] | None = None, timeout_s: float = 120.0,
                  ) -> tuple[StreamConsumer, CollectorRegistry]:
    """Run a consumer in this process until it handled ``expect`` records
    (then a graceful stop), or until it has been idle for ``idle_s``.
    ``wrap_engine`` wraps the configured engine (fault injection, e.g. a
    slow engine); ``on_start`` sees the consumer before it runs."""
    path = tmp / f"stream-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    settings = load_settings(path, env=env or {})
    registry = CollectorRegistry()
    pkg = load_package(settings.model_package)
    engine = create_engine(pkg, settings.engine)
    pred = Predictor(pkg, wrap_engine(engine) if wrap_engine else engine, path="stream",
                     metrics=get_metrics(registry), batch_size=settings.predict.batch_size)
    consumer = StreamConsumer(settings, pred, exit_when_idle_s=idle_s)
    if on_start is not None:
        on_start(consumer)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["rc"] = consumer.run()
        except BaseException as exc:
            outcome["exc"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    deadline = time.monotonic() + timeout_s
    while th.is_alive() and time.monotonic() < deadline:
        if expect is not None and consumer.counts["results"] + consumer.counts["dlq"] >= expect:
            consumer.stop()
        th.join(0.1)
    consumer.stop()
    th.join(60)
    pred.close()
    if "exc" in outcome:
        raise outcome["exc"]
    assert outcome.get("rc") == 0
    return consumer, registry




def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for fam in registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


class StreamProc:
    """``mmpipe stream`` as a subprocess, its JSON logs in a file."""

    def __init__(self, cfg: dict, tmp: Path, name: str, *, metrics_port: int | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        cfg = {**cfg, "metrics": {"enabled": True, "port": metrics_port}} if metrics_port else cfg
        self.config = tmp / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
        self._fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--log-level", "INFO", "stream", "--config", str(self.config)],
            cwd=REPO, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
        )

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float, pred: Callable[[dict], bool] = lambda e: True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events(name):
                if pred(ev):
                    return ev
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {name} event within {timeout}s; log tail:\n{self.diagnose()}")

    def diagnose(self, n: int = 6000) -> str:
        """The log's tail, with every thread's stack when the process is
        still running (``mmpipe`` dumps them on SIGUSR1): where it waits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
        return self.log.read_text(errors="replace")[-n:]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """The exit code; a process still running after ``timeout`` fails
        the test with every thread's stack and the log's tail (where it waits)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the consumer did not exit within {timeout}s; stacks and log tail:\n"
                                 f"{self.diagnose(12000)}") from None
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._fh.close()


def scrape_until(port: int, needle: str, timeout_s: float) -> str:
    """Scrape a /metrics endpoint until `needle` shows up (periodic gauges
    such as consumer lag appear one update interval after an assignment);
    returns the last scrape either way so the caller's assert says what was there."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)
