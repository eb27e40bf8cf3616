"""Fault cases on the Kafka stream path, against a real Apache Kafka broker.

1. ``mmpipe stream`` killed with SIGKILL mid-stream and started again, in
   at-least-once mode (duplicates allowed) and exactly-once mode (no
   duplicate among committed results);
2. the broker killed and restarted while records are produced and consumed;
3. on a three-broker cluster (KRaft, replication factor 3,
   ``min.insync.replicas=2``): the leader of the input partitions, and
   separately the leader of the output partition, killed with SIGKILL
   mid-stream, in at-least-once and exactly-once modes: no loss, and no
   duplicate for a read_committed reader in exactly-once;
7. a slow engine under a flood: backpressure pauses the partitions, the
   records buffered and in flight stay within ``stream.max_in_flight`` plus
   one fetch, memory stays flat, and every record gets its result.

Input records are keyed by id (broken ones too, so a dead letter, which
keeps its input's key, is accounted to its record); results are keyed by
record id.  Results are compared with the bare Predictor's.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("kafka")
pytest.importorskip("onnxruntime")

from pipeline.records import Result
from pipeline.stream import client
from pipeline.stream.consumer import StreamConsumer
from pipeline.stream.stages import H_REASON
from tests.faults.common import (
    SlowEngine,
    count_mismatches,
    expected_results,
    keyed_records,
    rss_mb,
    settled_rss_mb,
)
from tests.faults.outcome import FaultOutcome, account
from tests.integration.kafka_broker import KafkaCluster
from tests.integration.stream_helpers import (
    Reader,
    Sender,
    StreamProc,
    run_inprocess,
    settings_for,
    start_cluster,
    topics,
)

Report = Callable[[FaultOutcome], FaultOutcome]


def stream_outcome(case: str, records: list[tuple[str, bytes, str | None]], reader: Reader,
                   names: tuple[str, str, str], want: dict[str, Result], *, notes: str = "", retries: int = 0,
                   details: dict[str, Any] | None = None) -> FaultOutcome:
    """Account the output and dead-letter topics against the records sent;
    dead letters must carry the reason code their record was broken with."""
    out, dlq = reader.of(names[1]), reader.of(names[2])
    codes = {rid: code for rid, _, code in records}
    wrong_reason = [m.key.decode() for m in dlq if dict(m.headers).get(H_REASON, b"").decode()
                    != codes.get(m.key.decode())]
    mismatches = count_mismatches((Result.model_validate_json(m.value) for m in out), want)
    return account(case, "stream", [rid for rid, _, _ in records], [m.key.decode() for m in out],
                   [m.key.decode() for m in dlq], notes=notes, mismatches=mismatches, retries=retries,
                   details={"dlq_wrong_reason": len(wrong_reason), **(details or {})})


def assert_outcome(o: FaultOutcome) -> None:
    assert o.losses == 0, f"{o.losses} records lost, e.g. {o.lost_ids}"
    assert o.unexpected == 0, "results for records never sent"
    assert o.mismatches == 0, "results differ from the Predictor's"
    assert o.details.get("dlq_wrong_reason", 0) == 0, "dead letters with the wrong reason code"


# -- 1. consumer kill -9 and restart ------------------------------------------------------------------------------
@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_consumer_kill9_and_restart(broker, packages, tmp_path, report: Report, exactly_once: bool) -> None:
    names = topics(broker, partitions=2)
    records = keyed_records("retail", 240, prefix="k9", seed=8)
    want = expected_results(packages["retail"], records)
    extra = {"exactly_once": True, "transactional_id": f"tx-{names[0]}", "transaction_timeout_ms": 20000} \
        if exactly_once else {}
    cfg = settings_for(broker, packages["retail"], names, max_batch_records=4, **extra)
    sender = Sender(broker.bootstrap, names[0], [(rid, v) for rid, v, _ in records], delay_s=0.01)
    reader = Reader(broker.bootstrap, names[1], names[2], read_committed=exactly_once)
    first = StreamProc(cfg, tmp_path, "first")
    try:
        first.wait_event("partitions_assigned", 120)
        sender.start()
        reader.wait(lambda m: len(m) >= 40, 120)
        delivered_before_kill = len(reader.messages)
        assert delivered_before_kill >= 40, first.log.read_text()[-3000:]
        first.proc.send_signal(signal.SIGKILL)  # kill -9: no drain, no commit, no leave
        first.wait(30)
    finally:
        first.kill()
    sender.join(120)
    assert sender.error is None and not sender.failed and len(sender.acked) == len(records)
    second = StreamProc(cfg, tmp_path, "second")
    try:
        want_ids = {rid for rid, _, _ in records}
        reader.wait(lambda m: want_ids <= {x.key.decode() for x in m}, 180)
        second.signal(signal.SIGTERM)
        rc = second.wait(60)
    finally:
        second.kill()
    reader.wait(lambda m: False, 2)  # anything still in flight
    reader.close()
    mode = "exactly-once" if exactly_once else "at-least-once"
    o = report(stream_outcome(
        f"consumer kill -9 + restart ({mode})", records, reader, names, want,
        notes=f"killed after {delivered_before_kill} outputs; " + (
            "read_committed: duplicates must be 0" if exactly_once else "re-delivery since the last commit"),
        details={"mode": mode, "delivered_before_kill": delivered_before_kill, "restart_exit_code": rc}))
    assert rc == 0
    assert_outcome(o)
    if exactly_once:
        assert o.duplicates == 0, "exactly-once: one committed output per record"


# -- 3. a partition leader killed on a three-broker cluster ----------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # -> Iterator[KafkaCluster]
    c = start_cluster(tmp_path_factory.mktemp("kafka-cluster"))
    yield c
    c.close()


IN_REPLICAS, OUT_REPLICAS = [2, 3, 1], [3, 1, 2]  # input led by node 2, output and DLQ by node 3


def wait_new_leader(cluster: KafkaCluster, topic: str, dead: int, timeout: float = 60.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        leaders = cluster.leaders(topic)
        if all(v not in (dead, -1) for v in leaders.values()) or time.monotonic() > deadline:
            return leaders
        time.sleep(0.2)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
@pytest.mark.parametrize("victim", ["input", "output"])
def test_partition_leader_kill9_on_three_brokers(cluster: KafkaCluster, packages, tmp_path, report: Report,
                                                 victim: str, exactly_once: bool) -> None:
    cluster.ensure_running()  # a previous case killed a node
    tag = f"{victim[:2]}{int(exactly_once)}-{time.monotonic_ns() % 10**8}"
    names = (f"in-{tag}", f"out-{tag}", f"dlq-{tag}")
    cluster.create_topics([names[0]], 2, replicas=IN_REPLICAS)
    cluster.create_topics(list(names[1:]), 1, replicas=OUT_REPLICAS)
    victim_node, topic = (IN_REPLICAS[0], names[0]) if victim == "input" else (OUT_REPLICAS[0], names[1])
    assert set(cluster.leaders(topic).values()) == {victim_node}
    records = keyed_records("retail", 240, prefix=f"lk-{tag}", seed=13)
    want = expected_results(packages["retail"], records)
    extra = {"exactly_once": True, "transactional_id": f"tx-{names[0]}", "transaction_timeout_ms": 20000} \
        if exactly_once else {}
    cfg = settings_for(cluster, packages["retail"], names, **extra)
    sender = Sender(cluster.bootstrap, names[0], [(rid, v) for rid, v, _ in records], delay_s=0.01)
    reader = Reader(cluster.bootstrap, names[1], names[2], read_committed=exactly_once)
    proc = StreamProc(cfg, tmp_path, f"leader-{victim}")
    try:
        proc.wait_event("partitions_assigned", 120)
        sender.start()
        reader.wait(lambda m: len(m) >= 40, 120)
        before = len(reader.messages)
        assert before >= 40, proc.diagnose()
        t0 = time.monotonic()
        cluster.kill(victim_node)  # kill -9 the partition leader mid-stream
        leaders = wait_new_leader(cluster, topic, victim_node)
        failover_s = time.monotonic() - t0
        sender.join(240)
        assert sender.error is None and not sender.failed, sender.error
        want_ids = {rid for rid, _, _ in records}
        reader.wait(lambda m: want_ids <= {x.key.decode() for x in m}, 240)
        alive = proc.proc.poll() is None
        proc.signal(signal.SIGTERM)
        # A graceful stop after a node died may wait out client request
        # timeouts towards it (leaving the group, closing the producer).
        rc = proc.wait(150)
        reader.wait(lambda m: False, 2)  # anything still in flight
    finally:
        proc.kill()
        reader.close()
    mode = "exactly-once" if exactly_once else "at-least-once"
    retries = sum(len(proc.events(e)) for e in ("produce_retry", "commit_failed", "poll_retry", "transaction_aborted",
                                               "transaction_stalled"))
    o = report(stream_outcome(
        f"{victim} partition leader kill -9, 3 brokers ({mode})", records, reader, names, want, retries=retries,
        notes=f"node {victim_node} killed after {before} outputs; new leader in {failover_s:.1f} s"
              + ("; read_committed: duplicates must be 0" if exactly_once else ""),
        details={"mode": mode, "victim": victim, "killed_node": victim_node, "new_leaders": leaders,
                 "failover_s": round(failover_s, 1), "outputs_before_kill": before,
                 "consumer_alive": alive, "exit_code": rc, "input_acked": len(sender.acked)}))
    assert all(v not in (victim_node, -1) for v in leaders.values()), f"no new leader: {leaders}"
    assert alive and rc == 0, proc.diagnose()
    assert len(sender.acked) == len(records)
    assert_outcome(o)
    if exactly_once:
        assert o.duplicates == 0, "exactly-once: one committed output per record"


# -- 7. slow engine, flood, backpressure ----------------------------------------------------------------------------
def test_slow_engine_backpressure_bounds_memory(broker, packages, tmp_path, report: Report, caplog) -> None:
    names = topics(broker, partitions=2)
    # A flood of heavy records (a 256 KB metadata field each, about 100 MB) already waiting when the
    # consumer starts: large beside what a running consumer holds anyway (threads' heaps, ONNX
    # Runtime's arena, fetch buffers: 20-30 MB here), so following the flood cannot hide in that.
    records = keyed_records("retail", 400, prefix="flood", seed=9, pad_bytes=256 * 1024)
    flood_mb = sum(len(v) for _, v, _ in records) / 2**20
    want = expected_results(packages["retail"], records)
    sender = Sender(broker.bootstrap, names[0], [(rid, v) for rid, v, _ in records])
    sender.start()
    sender.join(300)
    assert sender.error is None and len(sender.acked) == len(records)
    max_in_flight, max_batch = 16, 4
    cfg = settings_for(broker, packages["retail"], names, max_in_flight=max_in_flight, max_batch_records=max_batch,
                       max_wait_ms=20)
    peak = {"in_flight": 0, "rss_mb": 0.0, "rss_ready_mb": 0.0}
    stop = threading.Event()

    def watch(consumer: StreamConsumer) -> None:
        """Instrument (not change) the consumer: after every fetch, count what
        it holds; meanwhile sample this process's memory."""
        add = consumer.batcher.add

        def counted_add(msgs: Any) -> int:
            dropped = add(msgs)
            peak["in_flight"] = max(peak["in_flight"], consumer.in_flight())
            return dropped

        consumer.batcher.add = counted_add  # type: ignore[method-assign]
        # The baseline is the consumer ready to run (model loaded, nothing
        # fetched yet): what loading costs is not what the flood costs.
        peak["rss_ready_mb"] = settled_rss_mb()

        def sample() -> None:
            while not stop.is_set():
                peak["rss_mb"] = max(peak["rss_mb"], rss_mb())
                time.sleep(0.02)

        threading.Thread(target=sample, daemon=True).start()

    caplog.set_level("INFO", logger="pipeline.stream.consumer")
    rss_before = settled_rss_mb()
    slow: list[SlowEngine] = []

    def make_slow(engine: Any) -> SlowEngine:
        slow.append(SlowEngine(engine, delay_s=0.125))
        return slow[0]

    try:
        consumer, _ = run_inprocess(cfg, tmp_path, expect=len(records), wrap_engine=make_slow, on_start=watch,
                                    timeout_s=300)
    finally:
        stop.set()
    one_fetch = client.consumer_kwargs(consumer.cfg)["max_poll_records"]
    reader = Reader(broker.bootstrap, names[1], names[2])
    want_ids = {rid for rid, _, _ in records}
    reader.wait(lambda m: want_ids <= {x.key.decode() for x in m}, 60)
    reader.close()
    events = [r.getMessage() for r in caplog.records]
    pauses, resumes = events.count("backpressure_pause"), events.count("backpressure_resume")
    bound = max_in_flight + one_fetch
    growth = peak["rss_mb"] - peak["rss_ready_mb"]
    o = report(stream_outcome(
        "slow engine under a flood", records, reader, names, want,
        notes=f"peak {peak['in_flight']} records held (bound {bound}); RSS {growth:+.0f} MB for a "
              f"{flood_mb:.0f} MB flood; {pauses} pauses",
        details={"max_in_flight": max_in_flight, "one_fetch": one_fetch, "peak_in_flight": peak["in_flight"],
                 "flood_mb": round(flood_mb, 1), "rss_before_mb": round(rss_before, 1),
                 "rss_ready_mb": round(peak["rss_ready_mb"], 1),
                 "rss_peak_mb": round(peak["rss_mb"], 1), "rss_growth_mb": round(growth, 1),
                 "engine_delay_s": slow[0].delay_s, "engine_calls": slow[0].calls,
                 "pauses": pauses, "resumes": resumes}))
    assert_outcome(o)
    assert pauses >= 1 and resumes >= 1, "the flood never paused the partitions"
    assert 0 < peak["in_flight"] <= bound, f"{peak['in_flight']} records held, bound {bound}"
    # Held records are bounded, so memory must not follow the flood (buffering
    # it all would add at least its size).
    assert growth < flood_mb / 2, f"RSS grew {growth:.0f} MB during a {flood_mb:.0f} MB flood"


# -- 2. broker killed and restarted (keep last: it restarts the module's broker) ---------------------------------------
def test_broker_restart_during_consumption(broker, packages, tmp_path, report: Report) -> None:
    names = topics(broker, partitions=2)
    records = keyed_records("retail", 300, prefix="br", seed=12)
    want = expected_results(packages["retail"], records)
    cfg = settings_for(broker, packages["retail"], names)
    proc = StreamProc(cfg, tmp_path, "restart")
    sender = Sender(broker.bootstrap, names[0], [(rid, v) for rid, v, _ in records], delay_s=0.02)
    outage_s = 0.0
    try:
        proc.wait_event("partitions_assigned", 120)
        sender.start()
        probe = Reader(broker.bootstrap, names[1], names[2])
        probe.wait(lambda m: len(m) >= 40, 120)
        before = len(probe.messages)
        probe.close()
        assert before >= 40, proc.log.read_text()[-3000:]
        t0 = time.monotonic()
        broker.stop(kill=True)  # kill -9 the broker while records are produced and consumed
        time.sleep(3)
        alive_during_outage = proc.proc.poll() is None
        broker.start()
        outage_s = time.monotonic() - t0
        sender.join(240)
        assert sender.error is None and not sender.failed, sender.error
        reader = Reader(broker.bootstrap, names[1], names[2])
        want_ids = {rid for rid, _, _ in records}
        reader.wait(lambda m: want_ids <= {x.key.decode() for x in m}, 180)
        proc.signal(signal.SIGTERM)
        rc = proc.wait(60)
        reader.wait(lambda m: False, 2)
        reader.close()
    finally:
        proc.kill()
    retries = len(proc.events("produce_retry")) + len(proc.events("commit_failed")) + len(proc.events("poll_retry"))
    o = report(stream_outcome(
        "broker kill -9 + restart", records, reader, names, want,
        notes=f"broker down {outage_s:.0f} s after {before} outputs; the consumer rode it out", retries=retries,
        details={"outage_s": round(outage_s, 1), "outputs_before_outage": before,
                 "consumer_alive_during_outage": alive_during_outage, "exit_code": rc,
                 "input_acked": len(sender.acked)}))
    assert alive_during_outage, "the consumer must ride out a broker outage"
    assert rc == 0
    assert len(sender.acked) == len(records)
    assert_outcome(o)
