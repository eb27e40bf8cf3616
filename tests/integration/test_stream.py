"""The stream consumer against a real Apache Kafka broker (KRaft, from Maven Central).

One broker serves the module (the broker-restart test starts its own).
Consumers run in-process where the test only needs results, and as
``mmpipe stream`` subprocesses where it needs ``kill -9``, SIGTERM or a
second group member.  Expected results come from the bare Predictor on the
same records, so a stream result must equal what every other path gives.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("kafka")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")  # the ONNX export of the tiny packages

from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from pipeline.config import EngineConfig
from pipeline.engines import create_engine
from pipeline.metrics import get_metrics
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import Result, record_bytes
from pipeline.stream.consumer import StreamError
from pipeline.tooling import sample_data
from tests.compare import assert_same
from tests.integration.kafka_broker import (
    SASL_PASSWORD,
    SASL_USER,
    SCRAM_PASSWORD,
    SCRAM_USER,
    free_port,
    kcat_binary,
)
from tests.integration.stream_helpers import (
    Reader,
    StreamProc,
    good_records,
    ids_of,
    metric,
    produce,
    run_inprocess,
    scrape_until,
    settings_for,
    start_broker,
    topics,
)
from tests.integration.triton_server import onnx_package

WORKLOADS = ("medical", "retail", "media")


# -- fixtures -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "onnx-packages"
    return {w: onnx_package(tiny_packages[w], root) for w in WORKLOADS}


@pytest.fixture(scope="module")
def predictors(packages: dict[str, Path]) -> dict[str, Predictor]:
    out = {}
    for w, d in packages.items():
        pkg = load_package(d)
        out[w] = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", threads=1)),
                           metrics=get_metrics(CollectorRegistry()))
    return out


# -- tests -------------------------------------------------------------------------------------------------------
def test_happy_path_all_workloads_match_the_predictor(broker, packages, predictors, tmp_path) -> None:
    """N records in per workload, N results out, keyed by id, each equal to the Predictor's."""
    for w in WORKLOADS:
        names = topics(broker, partitions=2)
        recs = good_records(w, 12, seed=5, prefix=f"{w}-ok")
        produce(broker.bootstrap, names[0], [json.dumps(r).encode() for r in recs], [r["id"].encode() for r in recs])
        consumer, registry = run_inprocess(settings_for(broker, packages[w], names), tmp_path, expect=len(recs))
        reader = Reader(broker.bootstrap, names[1], names[2])
        expected = len(recs)
        msgs = reader.wait(lambda m, expected=expected: len(m) >= expected, 30)
        reader.close()
        out = reader.of(names[1])
        assert reader.of(names[2]) == [], [dict(m.headers) for m in reader.of(names[2])]
        assert sorted(ids_of(out)) == sorted(r["id"] for r in recs) and len(msgs) == len(recs)
        pkg = load_package(packages[w])
        for m in out:
            h = dict(m.headers)
            assert h["mmpipe-model"] == pkg.name.encode() and h["mmpipe-model-version"] == pkg.version.encode()
            assert h["mmpipe-source-topic"] == names[0].encode()
            assert int(h["mmpipe-source-partition"]) in (0, 1) and int(h["mmpipe-source-offset"]) >= 0
        by_id = {m.key.decode(): Result.model_validate_json(m.value) for m in out}
        want = predictors[w].predict([json.dumps(r) for r in recs])
        assert_same([by_id[r.id] for r in want], want)
        lab = {"path": "stream", "workload": w}
        assert metric(registry, "mmpipe_records_total", outcome="ok", **lab) == len(recs)
        assert metric(registry, "mmpipe_end_to_end_seconds_count", **lab) == len(recs)
        assert metric(registry, "mmpipe_batch_size_count", **lab) >= 2  # micro-batches of at most 8
        assert metric(registry, "mmpipe_rebalances_total", kind="assigned", **lab) >= 1
        assert consumer.counts["results"] == len(recs)
        # kafka-python checks every fetched batch with the C CRC32C, and says so.
        assert metric(registry, "mmpipe_stream_client_info", crc32c="c", **lab) == 1
        # The lag gauge exists per partition and reads 0 once everything is done.
        lags = [s for f in registry.collect() for s in f.samples if s.name == "mmpipe_consumer_lag"]
        assert {s.labels["partition"] for s in lags} == {"0", "1"} and all(s.value == 0 for s in lags)


def test_poison_records_go_to_the_dlq_and_the_rest_is_processed(broker, packages, tmp_path) -> None:
    names = topics(broker, partitions=1)
    good = good_records("retail", 10, seed=6, prefix="ok")
    broken = sample_data.broken_records("retail", seed=2)
    values, reasons = [], {}
    for i, r in enumerate(good):
        values.append(json.dumps(r).encode())
        if i % 2 == 0 and broken:
            rec, reason = broken.pop()
            values.append(record_bytes(rec))
            reasons[len(values) - 1] = reason
    for rec, reason in broken:
        values.append(record_bytes(rec))
        reasons[len(values) - 1] = reason
    assert {"bad_json", "image_corrupt", "text_too_long"} <= set(reasons.values())
    produce(broker.bootstrap, names[0], values)
    _, registry = run_inprocess(settings_for(broker, packages["retail"], names), tmp_path, expect=len(values))
    reader = Reader(broker.bootstrap, names[1], names[2])
    reader.wait(lambda m: len(m) >= len(values), 30)
    reader.close()
    assert sorted(ids_of(reader.of(names[1]))) == sorted(r["id"] for r in good)
    dlq = reader.of(names[2])
    assert len(dlq) == len(reasons)
    for m in dlq:
        h = dict(m.headers)
        offset = int(h["mmpipe-source-offset"])
        assert h["mmpipe-source-topic"] == names[0].encode() and h["mmpipe-source-partition"] == b"0"
        assert m.value == values[offset], "the DLQ must carry the original bytes"
        assert h["mmpipe-reason"].decode() == reasons[offset], offset
        assert h["mmpipe-error"]
    for reason in set(reasons.values()):
        assert metric(registry, "mmpipe_dlq_records_total", reason=reason) == list(reasons.values()).count(reason)


def test_a_tombstone_goes_to_the_dlq_with_a_null_value(broker, packages, tmp_path) -> None:
    """A null value (a compaction delete marker) is no record: its dead letter
    keeps the null value (not an empty one) and says ``tombstone``."""
    names = topics(broker, partitions=1)
    good = good_records("retail", 3, seed=16, prefix="ts")
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    p.send(names[0], key=b"gone-1", value=None)
    for r in good:
        p.send(names[0], key=r["id"].encode(), value=json.dumps(r).encode())
    p.send(names[0], key=b"gone-2", value=None)
    p.flush()
    p.close()
    consumer, registry = run_inprocess(settings_for(broker, packages["retail"], names), tmp_path, expect=5)
    reader = Reader(broker.bootstrap, names[1], names[2])
    reader.wait(lambda m: len(m) >= 5, 30)
    reader.close()
    assert sorted(ids_of(reader.of(names[1]))) == sorted(r["id"] for r in good)
    dlq = reader.of(names[2])
    assert sorted(ids_of(dlq)) == ["gone-1", "gone-2"]
    for m in dlq:
        assert m.value is None, "a tombstone's dead letter must keep the null value"
        assert dict(m.headers)["mmpipe-reason"] == b"tombstone"
    assert consumer.counts["dlq:tombstone"] == 2
    assert metric(registry, "mmpipe_dlq_records_total", reason="tombstone") == 2
    kcat = kcat_binary()
    if kcat is not None:  # an independent client sees a null (-1), not an empty (0) value
        res = subprocess.run([kcat, "-b", broker.bootstrap, "-C", "-t", names[2], "-o", "beginning", "-e", "-q",
                              "-f", "%k %S\n"], capture_output=True, check=True, timeout=60)
        assert sorted(res.stdout.decode().split("\n")[:-1]) == ["gone-1 -1", "gone-2 -1"]


def test_backpressure_pauses_and_resumes_without_losing_records(broker, packages, tmp_path, caplog) -> None:
    names = topics(broker, partitions=2)
    recs = good_records("retail", 60, seed=7, prefix="bp")
    produce(broker.bootstrap, names[0], [json.dumps(r).encode() for r in recs])
    caplog.set_level("INFO", logger="pipeline.stream.consumer")
    run_inprocess(settings_for(broker, packages["retail"], names, max_in_flight=8, max_batch_records=4), tmp_path,
                  expect=len(recs))
    events = [r.getMessage() for r in caplog.records]
    assert "backpressure_pause" in events and "backpressure_resume" in events
    reader = Reader(broker.bootstrap, names[1])
    reader.wait(lambda m: len(m) >= len(recs), 30)
    reader.close()
    assert sorted(set(ids_of(reader.messages))) == sorted(r["id"] for r in recs)


def _kill9_and_restart(broker, packages, tmp_path, exactly_once: bool) -> tuple[list[str], Reader]:
    names = topics(broker, partitions=2)
    recs = good_records("retail", 150, seed=8, prefix="k9")
    extra = {"exactly_once": True, "transactional_id": f"tx-{names[0]}", "transaction_timeout_ms": 20000} \
        if exactly_once else {}
    cfg = settings_for(broker, packages["retail"], names, max_batch_records=4, **extra)
    producer = threading.Thread(
        target=produce, args=(broker.bootstrap, names[0], [json.dumps(r).encode() for r in recs]),
        kwargs={"delay_s": 0.02}, daemon=True,
    )
    reader = Reader(broker.bootstrap, names[1], read_committed=exactly_once)
    first = StreamProc(cfg, tmp_path, "first")
    try:
        first.wait_event("partitions_assigned", 120)
        producer.start()
        reader.wait(lambda m: len(m) >= 30, 120)
        assert len(reader.messages) >= 30, first.diagnose()
        first.proc.send_signal(signal.SIGKILL)  # kill -9: no drain, no commit, no leave
        first.wait(30)
    finally:
        first.kill()
    producer.join(60)
    second = StreamProc(cfg, tmp_path, "second")
    try:
        want = {r["id"] for r in recs}
        reader.wait(lambda m: want <= set(ids_of(m)), 180)
        second.signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        second.kill()
    reader.wait(lambda m: False, 2)  # anything still in flight
    reader.close()
    return [r["id"] for r in recs], reader


def test_kill9_mid_stream_at_least_once(broker, packages, tmp_path) -> None:
    ids, reader = _kill9_and_restart(broker, packages, tmp_path, exactly_once=False)
    got = ids_of(reader.messages)
    assert set(ids) - set(got) == set(), "at-least-once: no input may be lost"


def test_kill9_mid_stream_exactly_once(broker, packages, tmp_path) -> None:
    ids, reader = _kill9_and_restart(broker, packages, tmp_path, exactly_once=True)
    got = ids_of(reader.messages)
    dupes = sorted({i for i in got if got.count(i) > 1})
    assert sorted(got) == sorted(ids), f"exactly one committed result per input; duplicates: {dupes[:10]}"


def test_two_members_share_partitions_and_one_takes_over(broker, packages, tmp_path) -> None:
    names = topics(broker, partitions=4)
    cfg = settings_for(broker, packages["retail"], names)
    ports = [free_port(), free_port()]
    a = StreamProc(cfg, tmp_path, "a", metrics_port=ports[0])
    b = StreamProc(cfg, tmp_path, "b", metrics_port=ports[1])
    reader = Reader(broker.bootstrap, names[1])
    try:
        def two_each(ev: dict) -> bool:
            return len(ev["partitions"].split(",")) == 2

        a.wait_event("partitions_assigned", 120, two_each)
        b.wait_event("partitions_assigned", 120, two_each)
        first = good_records("retail", 40, seed=9, prefix="g1")
        produce(broker.bootstrap, names[0], [json.dumps(r).encode() for r in first],
                [r["id"].encode() for r in first])
        reader.wait(lambda m: len(m) >= len(first), 120)
        assert {r["id"] for r in first} <= set(ids_of(reader.messages))
        parts = {int(dict(m.headers)["mmpipe-source-partition"]) for m in reader.messages}
        assert parts == {0, 1, 2, 3}
        scraped = scrape_until(ports[0], "mmpipe_consumer_lag{", 30)
        assert 'mmpipe_records_total{model=' in scraped and 'path="stream"' in scraped
        assert "mmpipe_consumer_lag{" in scraped, "the lag gauge (updated every lag_interval_s) never appeared"
        # a leaves the group gracefully; b must take over all four partitions.
        a.signal(signal.SIGTERM)
        assert a.wait(60) == 0
        assert a.events("stream_stopped")
        b.wait_event("partitions_assigned", 120, lambda ev: len(ev["partitions"].split(",")) == 4)
        second = good_records("retail", 40, seed=10, prefix="g2")
        produce(broker.bootstrap, names[0], [json.dumps(r).encode() for r in second],
                [r["id"].encode() for r in second])
        want = {r["id"] for r in first + second}
        reader.wait(lambda m: want <= set(ids_of(m)), 120)
        assert want - set(ids_of(reader.messages)) == set()
        b.signal(signal.SIGTERM)
        assert b.wait(60) == 0
    finally:
        a.kill()
        b.kill()
        reader.close()


def test_broker_restart_during_consumption_loses_nothing(packages, tmp_path) -> None:
    own = start_broker(tmp_path / "kafka")
    try:
        names = topics(own, partitions=2)
        cfg = settings_for(own, packages["retail"], names)
        first = good_records("retail", 60, seed=12, prefix="r1")
        second = good_records("retail", 60, seed=13, prefix="r2")
        proc = StreamProc(cfg, tmp_path, "restart")
        reader = None
        try:
            proc.wait_event("partitions_assigned", 120)
            produce(own.bootstrap, names[0], [json.dumps(r).encode() for r in first])
            reader = Reader(own.bootstrap, names[1])
            reader.wait(lambda m: len(m) >= 20, 60)
            reader.close()
            own.stop()
            time.sleep(3)
            assert proc.proc.poll() is None, "the consumer must ride out a broker outage"
            own.start()
            produce(own.bootstrap, names[0], [json.dumps(r).encode() for r in second])
            reader = Reader(own.bootstrap, names[1])
            want = {r["id"] for r in first + second}
            reader.wait(lambda m: want <= set(ids_of(m)), 180)
            assert want - set(ids_of(reader.messages)) == set(), proc.log.read_text()[-3000:]
            proc.signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            proc.kill()
            if reader is not None:
                reader.close()
    finally:
        own.close()


def test_kcat_produces_input_and_reads_output(broker, packages, predictors, tmp_path) -> None:
    kcat = kcat_binary()
    if kcat is None:
        pytest.skip("kcat is not installed and could not be installed (apt-get install kcat)")
    names = topics(broker, partitions=1)
    recs = good_records("media", 6, seed=14, prefix="kc")
    lines = "".join(f"{r['id']}\t{json.dumps(r)}\n" for r in recs)
    subprocess.run([kcat, "-b", broker.bootstrap, "-P", "-t", names[0], "-K", "\t"], input=lines.encode(),
                   check=True, timeout=60)
    run_inprocess(settings_for(broker, packages["media"], names), tmp_path, expect=len(recs))
    res = subprocess.run(
        [kcat, "-b", broker.bootstrap, "-C", "-t", names[1], "-o", "beginning", "-e", "-q",
         "-f", "%k\t%h\t%s\n"], capture_output=True, check=True, timeout=60,
    )
    rows = [ln.split(b"\t", 2) for ln in res.stdout.splitlines() if ln.strip()]
    assert sorted(k.decode() for k, _, _ in rows) == sorted(r["id"] for r in recs)
    for _, headers, _ in rows:
        assert b"mmpipe-model=" in headers and b"mmpipe-source-topic=" + names[0].encode() in headers
    got = {k.decode(): Result.model_validate_json(v) for k, _, v in rows}
    want = predictors["media"].predict([json.dumps(r) for r in recs])
    assert_same([got[r.id] for r in want], want)


@pytest.mark.parametrize("mechanism,user,password", [
    ("PLAIN", SASL_USER, SASL_PASSWORD), ("SCRAM-SHA-256", SCRAM_USER, SCRAM_PASSWORD),
])
def test_sasl_settings_from_env_and_secrets_never_logged(broker, packages, tmp_path, caplog, capfd,
                                                         mechanism, user, password) -> None:
    names = topics(broker, partitions=1)
    recs = good_records("retail", 4, seed=15, prefix=f"sasl-{mechanism}")
    produce(broker.bootstrap, names[0], [json.dumps(r).encode() for r in recs])
    cfg = settings_for(broker, packages["retail"], names, bootstrap_servers=[broker.sasl_bootstrap],
                       security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism, sasl_username=user)
    caplog.set_level("DEBUG")
    consumer, _ = run_inprocess(cfg, tmp_path, expect=len(recs), env={"MMPIPE__STREAM__SASL_PASSWORD": password})
    assert consumer.counts["results"] == len(recs)
    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err + "".join(str(r.__dict__) for r in caplog.records)
    assert password not in logged
    if mechanism != "PLAIN":
        return
    # A wrong password is refused with an error, not a hang and not a leak.
    cfg["stream"]["connect_timeout_ms"] = 4000
    with pytest.raises(StreamError, match="cannot connect to Kafka") as err:
        run_inprocess(cfg, tmp_path, env={"MMPIPE__STREAM__SASL_PASSWORD": "wrong-" + password}, idle_s=2)
    assert password not in str(err.value) and password not in caplog.text
