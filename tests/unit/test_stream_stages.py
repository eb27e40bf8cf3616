"""The stream's Kafka-free stages and client settings, without a broker."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import StreamConfig, load_settings
from pipeline.stream import client
from pipeline.stream.stages import Backpressure, InMessage, MicroBatcher, OffsetTracker


def msg(offset: int, partition: int = 0, topic: str = "in", value: bytes | None = b"{}") -> InMessage:
    return InMessage(topic, partition, offset, None, value, 1_700_000_000_000)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_batcher_closes_on_size_or_wait() -> None:
    clock = Clock()
    b = MicroBatcher(max_records=3, max_wait_s=0.05, clock=clock)
    assert not b.ready() and b.time_left() == float("inf")
    b.add([msg(0), msg(1)])
    assert not b.ready() and b.time_left() == pytest.approx(0.05)
    clock.t = 0.06
    assert b.ready()
    b.add([msg(2), msg(3)])
    assert [m.offset for m in b.take()] == [0, 1, 2]
    assert len(b) == 1 and not b.ready()  # the rest waits from now
    clock.t = 0.2
    assert [m.offset for m in b.take()] == [3]


def test_batcher_never_feeds_an_offset_twice_in_a_generation() -> None:
    b = MicroBatcher(10, 1.0)
    assert b.add([msg(0), msg(1), msg(1, partition=1)]) == 0
    assert b.add([msg(1), msg(0), msg(2)]) == 2  # a re-fetch after a retry
    assert [(m.partition, m.offset) for m in b.take()] == [(0, 0), (0, 1), (1, 1), (0, 2)]
    b.assigned([("in", 0)])  # a new generation starts from the committed offset again
    assert b.add([msg(1)]) == 0


def test_batcher_revocation_drops_only_revoked_partitions() -> None:
    b = MicroBatcher(10, 1.0)
    b.add([msg(5), msg(6), msg(7, partition=1)])
    assert b.first_offsets([("in", 0), ("in", 1)]) == {("in", 0): 5, ("in", 1): 7}
    assert b.revoked([("in", 0)]) == 2
    assert [(m.partition, m.offset) for m in b.take()] == [(1, 7)]


def test_offset_tracker_commits_one_past_the_last_acknowledged() -> None:
    t = OffsetTracker()
    t.complete([msg(3), msg(4), msg(9, partition=1)])
    assert t.pending() == {("in", 0): 5, ("in", 1): 10}
    t.mark_committed({("in", 0): 5})
    assert t.pending() == {("in", 1): 10}
    t.complete([msg(2)])  # an older batch never moves the commit point back
    assert t.done[("in", 0)] == 5
    t.forget([("in", 1)])
    assert t.pending() == {}
    assert OffsetTracker.offsets_of([msg(1), msg(7), msg(3)]) == {("in", 0): 8}


def test_backpressure_has_a_gap_between_pause_and_resume() -> None:
    bp = Backpressure(10)
    assert bp.update(9) is None
    assert bp.update(10) == "pause" and bp.paused
    assert bp.update(7) is None  # still above the low mark
    assert bp.update(5) == "resume" and not bp.paused
    assert bp.update(5) is None


def test_security_settings_pass_through_and_secrets_stay_out_of_logs(tmp_path, caplog) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text(json.dumps({"stream": {
        "bootstrap_servers": ["k:9093"], "input_topics": ["a"], "output_topic": "b", "dlq_topic": "c",
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "svc",
        "ssl_cafile": str(ca),
    }}))
    settings = load_settings(cfg_file, env={"MMPIPE__STREAM__SASL_PASSWORD": "hunter2-secret"})
    kw = client.consumer_kwargs(settings.stream)
    assert kw["security_protocol"] == "SASL_SSL" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kw["sasl_plain_username"] == "svc" and kw["sasl_plain_password"] == "hunter2-secret"
    assert kw["ssl_cafile"] == str(ca) and kw["enable_auto_commit"] is False
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in json.dumps(client.describe(settings.stream))
    prod = client.producer_kwargs(settings.stream)
    assert prod["acks"] == "all" and "transactional_id" not in prod
    settings.stream.exactly_once = True
    assert client.producer_kwargs(settings.stream)["transactional_id"].startswith("mmpipe-mmpipe-")
    assert client.consumer_kwargs(settings.stream)["isolation_level"] == "read_committed"
    caplog.set_level(logging.DEBUG)
    assert "hunter2-secret" not in caplog.text


def test_security_misconfiguration_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="sasl_mechanism"):
        client.security_kwargs(StreamConfig(security_protocol="SASL_PLAINTEXT"))
    with pytest.raises(ValueError, match="sasl_password"):
        client.security_kwargs(StreamConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                                            sasl_username="u"))
    with pytest.raises(ValueError, match="ssl_cafile does not exist"):
        client.security_kwargs(StreamConfig(security_protocol="SSL", ssl_cafile=tmp_path / "missing.pem"))


def test_kafka_python_checks_crc32c_in_c() -> None:
    """The C CRC32C (the ``crc32c`` package, in the stream extra) must be the
    one kafka-python uses: the pure-Python one checksums about 9 MB/s and
    caps the stream far below the model."""
    assert client.crc32c_impl() == "c", "pip install crc32c (the stream extra)"


def test_batching_and_fetch_sizes_reach_the_clients() -> None:
    cfg = StreamConfig(linger_ms=7, producer_batch_bytes=123456, fetch_max_wait_ms=40, fetch_min_bytes=2,
                       max_partition_fetch_bytes=1 << 22)
    prod, cons = client.producer_kwargs(cfg), client.consumer_kwargs(cfg)
    assert (prod["linger_ms"], prod["batch_size"]) == (7, 123456)
    assert (cons["fetch_max_wait_ms"], cons["fetch_min_bytes"], cons["max_partition_fetch_bytes"]) == (40, 2, 1 << 22)
