"""Exactly-once: a transaction step that never finishes does not hang the
consumer.  kafka-python waits without a bound in ``commit_transaction`` and
``send_offsets_to_transaction``, and a request caught on a coordinator that
was killed mid-flight can stay pending for good (seen on the three-broker
fault suite).  The consumer's own logic is tested here against a stand-in
for the producer's transactional results; the real broker cases are in
tests/faults/test_stream_faults.py."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from pipeline.config import load_settings
from pipeline.predictor import Predictor
from pipeline.stream.consumer import StreamConsumer, StreamError, _Batch
from pipeline.stream.stages import InMessage, OutMessage


class Result:
    """kafka-python's TransactionalRequestResult: done or never."""

    def __init__(self, done: bool) -> None:
        self._latch = threading.Event()
        if done:
            self._latch.set()

    def wait(self, timeout_ms: float | None = None) -> bool:
        return self._latch.wait(None if timeout_ms is None else timeout_ms / 1000)


class Producer:
    def __init__(self, offsets_done: bool) -> None:
        self.sent: list[str] = []
        self.closed: float | None = None
        self._sender = SimpleNamespace(wakeup=lambda: None)
        self._transaction_manager = SimpleNamespace(
            send_offsets_to_transaction=lambda offsets, meta: Result(offsets_done),
            begin_commit=lambda: Result(True), begin_abort=lambda: Result(True))

    def begin_transaction(self) -> None:
        pass

    def send(self, topic, value=None, key=None, headers=None):
        self.sent.append(topic)
        return SimpleNamespace(get=lambda timeout=None: None)  # acknowledged inside the transaction

    def close(self, timeout: float | None = None) -> None:
        self.closed = timeout


class Consumer:
    def __init__(self, committed: int | None = None) -> None:
        self.seeks: list[tuple[str, int, int]] = []
        self._committed = committed

    def committed(self, tp, timeout_ms=None) -> int | None:
        return self._committed

    def group_metadata(self) -> str:
        return "g"

    def assignment(self) -> set:
        from kafka import TopicPartition

        return {TopicPartition("in", 0)}

    def seek(self, tp, offset: int) -> None:
        self.seeks.append((tp.topic, tp.partition, offset))


@pytest.fixture()
def consumer(tiny_packages, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_package: {tiny_packages['retail']}\n"
                   "stream: {input_topics: [in], output_topic: out, dlq_topic: dlq, exactly_once: true,\n"
                   "         transaction_timeout_ms: 300, commit_retry_backoff_ms: 0}\n")
    settings = load_settings(cfg, env={})
    predictor = Predictor.from_settings(settings, path="stream")
    c = StreamConsumer(settings, predictor)
    c.consumer = Consumer()
    yield c
    predictor.close()


def _batch(c: StreamConsumer, offsets: range) -> _Batch:
    msgs = [InMessage("in", 0, o, None, b"{}", 1_700_000_000_000) for o in offsets]
    outs = [OutMessage("result", "out", None, b"{}", [], m) for m in msgs]
    work: Future = Future()
    work.set_result((outs, []))
    return _Batch(msgs, work, c._generation)


def test_a_stalled_transaction_step_replaces_the_producer_and_rewinds(consumer: StreamConsumer) -> None:
    stuck, fresh = Producer(offsets_done=False), Producer(offsets_done=True)
    consumer.producer = stuck
    consumer._new_producer = lambda: fresh  # type: ignore[method-assign]
    consumer._inflight.extend([_batch(consumer, range(10, 14)), _batch(consumer, range(14, 16))])
    consumer._harvest(block=True)  # returns: the stall is bounded by transaction_timeout_ms
    assert consumer.producer is fresh and stuck.closed == 0  # the stuck one force-closed, not waited on
    assert not consumer._inflight and consumer.consumer.seeks == [("in", 0, 10)]  # read again from the first
    assert not consumer.tracker.pending() and consumer.counts["results"] == 0  # nothing counted as committed
    # The next transaction goes through on the new producer and commits where the rewind left off.
    consumer._inflight.append(_batch(consumer, range(10, 12)))
    consumer._harvest(block=True)
    assert fresh.sent == ["out", "out"] and consumer.counts["results"] == 2


def test_a_second_signal_abandons_a_stalled_transaction(consumer: StreamConsumer) -> None:
    consumer.producer = Producer(offsets_done=False)
    consumer._inflight.append(_batch(consumer, range(0, 2)))
    consumer.cfg = consumer.cfg.model_copy(update={"transaction_timeout_ms": 600_000})
    threading.Timer(0.3, consumer.abandon).start()
    with pytest.raises(StreamError, match="abandoned"):
        consumer._harvest(block=True)


def test_a_stalled_transaction_that_did_commit_is_not_written_again(consumer: StreamConsumer) -> None:
    """The stalled step was the commit, and the coordinator had it: the new
    producer's fencing completed it.  The partition resumes after it (the
    group's committed offset), not at the batches' first offset."""
    consumer.consumer = Consumer(committed=16)
    stuck = Producer(offsets_done=True)
    stuck._transaction_manager.begin_commit = lambda: Result(False)  # the commit's answer never comes
    consumer.producer = stuck
    consumer._new_producer = lambda: Producer(offsets_done=True)  # type: ignore[method-assign]
    consumer._inflight.extend([_batch(consumer, range(10, 14)), _batch(consumer, range(14, 16))])
    consumer._harvest(block=True)
    assert consumer.consumer.seeks == [("in", 0, 16)] and not consumer._inflight
