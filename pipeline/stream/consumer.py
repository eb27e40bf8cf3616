"""The Kafka stream consumer: a consumer-group member that tags records as
they arrive.

The main thread owns the kafka-python consumer (it is not thread safe): it
polls, fills the :class:`MicroBatcher`, hands closed batches on, commits
what is finished and applies backpressure.  A batch then flows through two
single-thread stages, so the work overlaps instead of queueing:

    main: poll -> batch -> | decode thread: validate + decode (batch N+1)
                           | engine thread: infer + encode + send (batch N)
    main: harvest acknowledged batches, in order -> commit

The engine never waits for the broker: it hands a batch's messages to the
producer (whose own IO thread sends them) and takes the next batch; the main
thread checks the acknowledgements later.  Delivery guarantees:

* at-least-once (default): a batch's offsets are committed only after the
  broker acknowledged every result and dead letter of that batch, and only
  in batch order.  A crash re-delivers at most the batches since the last
  commit; nothing is lost.
* exactly-once (``stream.exactly_once``): decode and inference still run
  ahead in the two stages; the main thread writes the outputs of every
  finished batch and their consumed offsets in one transaction (KIP-447
  group metadata, so a zombie is fenced); downstream reads with
  read_committed.  Transactions themselves are serial (kafka-python allows
  one open transaction per producer), so the main thread, not the engine,
  waits for the broker; when several batches finish during one transaction
  the next transaction carries them all.

Rebalances: on revocation everything acknowledged is committed before the
partitions go; at-least-once, a batch still in flight is delivered but not
committed, exactly-once it is dropped untransacted and its partitions are
rewound; buffered records of revoked partitions are dropped uncommitted
(the next owner reads them again).  SIGTERM/SIGINT (``stop``) finish and
commit what is in flight, then leave the group; a second signal abandons the
in-flight work uncommitted (``abandon``), which loses nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata
from kafka import TopicPartition as KTP
from kafka.errors import KafkaError
from kafka.future import Future as KFuture

from pipeline.config import Settings
from pipeline.generate import generator_for
from pipeline.log import log_event
from pipeline.predictor import Predictor
from pipeline.stream import client
from pipeline.stream.stages import (
    Backpressure,
    Decoded,
    InMessage,
    MicroBatcher,
    OffsetTracker,
    OutMessage,
    PredictStage,
    TopicPartition,
)

logger = logging.getLogger(__name__)

Sent = list[tuple[OutMessage, Any]]  # messages handed to the producer, with kafka-python's futures


class StreamError(RuntimeError):
    """The consumer cannot go on (fatal client error, fenced, misconfigured).

    Nothing unacknowledged has been committed, so a restart loses nothing."""


@dataclass
class _Batch:
    """One micro-batch on its way: the messages, the decode+infer(+send)
    work, and (at-least-once) the sends still to be acknowledged."""

    msgs: list[InMessage]
    work: Future[tuple[list[OutMessage], Sent]]
    generation: int
    outs: list[OutMessage] | None = None
    sent: Sent = field(default_factory=list)
    checked: int = 0  # sent[:checked] are known to be done
    retry_at: float | None = None
    backoff: float = 0.5


class StreamConsumer:
    """One consumer-group member; ``run()`` until ``stop()``."""

    def __init__(self, settings: Settings, predictor: Predictor, *, exit_when_idle_s: float | None = None) -> None:
        cfg = settings.stream
        missing = [n for n in ("input_topics", "output_topic", "dlq_topic") if not getattr(cfg, n)]
        if missing:
            raise ValueError(f"stream config lacks {', '.join('stream.' + m for m in missing)}")
        assert cfg.output_topic is not None and cfg.dlq_topic is not None
        # kafka-python logs the SASL handshake bytes (username and password)
        # at DEBUG: its loggers never go below INFO, whatever the root level.
        kafka_log = logging.getLogger("kafka")
        if kafka_log.getEffectiveLevel() < logging.INFO:
            kafka_log.setLevel(logging.INFO)
        self.cfg = cfg
        self.predictor = predictor
        _large_buffers_off_the_heap()
        # generate.enabled: each result also carries the generative head's text (refused here without one)
        self.stage = PredictStage(predictor, cfg.output_topic, cfg.dlq_topic,
                                  generator_for(predictor.package, settings))
        self.batcher = MicroBatcher(cfg.max_batch_records, cfg.max_wait_ms / 1000)
        self.tracker = OffsetTracker()
        self.bp = Backpressure(cfg.max_in_flight)
        self.metrics = predictor.metrics
        self.labels = self.stage.labels
        self.exit_when_idle_s = exit_when_idle_s
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._abandon = threading.Event()
        self._inflight: deque[_Batch] = deque()
        self._generation = 0  # bumped on every revocation: older batches' offsets are not ours to commit
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="mmpipe-stream-decode")
        self._engine = ThreadPoolExecutor(1, thread_name_prefix="mmpipe-stream-engine")
        self._next_commit = 0.0
        self._next_lag = 0.0
        self._lag_labels: set[TopicPartition] = set()
        self._closing = False
        self._rewind_to: dict[TopicPartition, int] = {}
        self._last_record = time.monotonic()
        # Labeled metric children, bound once (no label look-up per message).
        m, lab = self.metrics, self.labels
        self._m_e2e = m.end_to_end_seconds.labels(**lab)
        self._m_commit_failures = m.commit_failures.labels(**lab)
        self._m_depth = m.queue_depth.labels(**lab)
        self._m_paused = m.paused_partitions.labels(**lab)
        self._m_dlq: dict[str, Any] = {}
        self.crc32c = client.crc32c_impl()
        m.stream_client_info.labels(**lab, client_version=client.kafka_python_version(), crc32c=self.crc32c).set(1)
        self.consumer: Any = None
        self.producer: Any = None
        self.ready = threading.Event()  # set once the group assigned partitions (tests, health)

    # -- control ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish and commit the in-flight work, then leave the group."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def abandon(self) -> None:
        """Stop without waiting: in-flight work stays uncommitted (re-delivered later)."""
        self._abandon.set()
        self._stop.set()

    # -- lifecycle ---------------------------------------------------------------------------------
    def _connect(self) -> None:
        log_event(logger, logging.INFO, "stream_connecting", **client.describe(self.cfg))
        if self.crc32c == "c":
            log_event(logger, logging.INFO, "stream_kafka_client", kafka_python=client.kafka_python_version(),
                      crc32c=self.crc32c)
        else:
            log_event(logger, logging.WARNING, "stream_kafka_client", kafka_python=client.kafka_python_version(),
                      crc32c=self.crc32c, hint="the C CRC32C is missing: pip install crc32c (the stream extra); "
                      "every fetched batch is checksummed in pure Python")
        try:
            self.producer = self._new_producer()
            for topic in (self.cfg.output_topic, self.cfg.dlq_topic):
                if not self.producer.partitions_for(topic):
                    raise StreamError(f"topic {topic!r} does not exist (create it; auto-creation is not relied on)")
            self.consumer = KafkaConsumer(**client.consumer_kwargs(self.cfg))
            # Subscribe first, then fetch the input topics' metadata, so the
            # first join already knows their partitions.  The other order
            # joins on a metadata snapshot that the next refresh (narrowed to
            # the subscription) replaces, and kafka-python then rebalances a
            # second time a moment after the first assignment, revoking
            # partitions whose first batch may already be in flight.  Joining
            # with no metadata at all assigns nothing at first.
            self.consumer.subscribe(self.cfg.input_topics, listener=_Listener(self))
            for topic in self.cfg.input_topics:
                if not self.consumer.partitions_for_topic(topic):
                    raise StreamError(f"input topic {topic!r} does not exist")
        except KafkaError as exc:
            raise StreamError(
                f"cannot connect to Kafka ({type(exc).__name__}): {exc}; check stream.bootstrap_servers, "
                "security_protocol and the credentials"
            ) from exc

    def _new_producer(self) -> Any:
        producer = KafkaProducer(max_block_ms=30_000, **client.producer_kwargs(self.cfg))
        if self.cfg.exactly_once:
            # Fences a previous instance (or a previous producer of this one)
            # with the same transactional id and aborts its open transaction.
            producer.init_transactions()
        return producer

    def run(self) -> int:
        """Consume until stopped.  Returns 0 after a clean stop."""
        try:
            self._connect()
            while not self._stop.is_set():
                self._step()
                if (self.exit_when_idle_s is not None and not self._inflight and not len(self.batcher)
                        and time.monotonic() - self._last_record >= self.exit_when_idle_s):
                    log_event(logger, logging.INFO, "stream_idle_exit", idle_s=self.exit_when_idle_s)
                    break
            self._drain()
            return 0
        finally:
            self._close()

    def _step(self) -> None:
        # Submit first: the stages work on new batches while the harvest
        # below waits for the broker (an exactly-once transaction).
        while self.batcher.ready():
            self._submit(self.batcher.take())
        self._harvest(block=False)
        self._commit()
        self._backpressure()
        wait = min(self.batcher.time_left(), 0.1)
        if self._inflight:
            wait = min(wait, 0.005)  # come back soon to harvest what the broker acknowledged
        try:
            polled = self.consumer.poll(timeout_ms=max(int(wait * 1000), 1))
        except KafkaError as exc:
            if not getattr(exc, "retriable", False):
                raise StreamError(f"consumer failed ({type(exc).__name__}): {exc}") from exc
            log_event(logger, logging.WARNING, "poll_retry", exc_type=type(exc).__name__)
            time.sleep(0.5)
            return
        n = 0
        for msgs in polled.values():
            n += len(msgs)
            dropped = self.batcher.add(InMessage.from_kafka(m) for m in msgs)
            if dropped:
                log_event(logger, logging.WARNING, "duplicate_offsets_dropped", count=dropped)
        if n:
            self._last_record = time.monotonic()
            self.counts["in"] += n
        self._lag()

    def _drain(self) -> None:
        """Graceful stop: finish, deliver and commit every submitted batch."""
        if self._abandon.is_set():
            log_event(logger, logging.WARNING, "stream_abandoned", in_flight=sum(len(b.msgs) for b in self._inflight))
            return
        self._harvest(block=True)
        self._commit(force=True)
        self._lag(force=True)
        log_event(logger, logging.INFO, "stream_drained", buffered_not_processed=len(self.batcher), **self.counts)

    def _close(self) -> None:
        for pool in (self._decoder, self._engine):
            pool.shutdown(wait=not self._abandon.is_set(), cancel_futures=True)
        self._closing = True  # the final revocation keeps the last lag readings for a last scrape
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False)  # leaves the group: partitions move at once
            except Exception as exc:  # closing must not mask the reason we stopped
                log_event(logger, logging.WARNING, "consumer_close_failed", exc_type=type(exc).__name__)
        if self.producer is not None:
            try:
                self.producer.close(timeout=5 if self._abandon.is_set() else 30)
            except Exception as exc:
                log_event(logger, logging.WARNING, "producer_close_failed", exc_type=type(exc).__name__)
        log_event(logger, logging.INFO, "stream_stopped", **self.counts)

    # -- batches: the two stages -------------------------------------------------------------------
    def _submit(self, batch: list[InMessage]) -> None:
        """Decode on the decode thread, then infer (and, at-least-once, send)
        on the engine thread; both keep batch order."""
        decoded = self._decoder.submit(self.stage.decode, batch)
        work = self._engine.submit(self._infer if self.cfg.exactly_once else self._infer_and_send, decoded)
        self._inflight.append(_Batch(batch, work, self._generation))
        self._gauge_depth()

    def _infer(self, decoded: Future[Decoded]) -> tuple[list[OutMessage], Sent]:
        return self.stage.finish(decoded.result()), []

    def _infer_and_send(self, decoded: Future[Decoded]) -> tuple[list[OutMessage], Sent]:
        """Engine thread: infer, then hand the outputs to the producer and go
        on to the next batch; acknowledgements are checked by the main thread."""
        outs = self.stage.finish(decoded.result())
        return outs, [(o, self._send(o)) for o in outs]

    def _send(self, o: OutMessage) -> Any:
        try:
            return self.producer.send(o.topic, value=o.value, key=o.key, headers=o.headers)
        except Exception as exc:  # e.g. metadata unavailable while the broker is away
            f = KFuture()
            f.failure(exc if getattr(exc, "retriable", False) else _Retriable(str(exc)))
            return f

    @staticmethod
    def _outputs(b: _Batch, *, block: bool) -> bool:
        """Collect a batch's decode+infer result once it is there."""
        if b.outs is not None:
            return True
        if not block and not b.work.done():
            return False
        try:
            b.outs, b.sent = b.work.result()
        except StreamError:
            raise
        except Exception as exc:
            raise StreamError(f"a batch failed ({type(exc).__name__}); its offsets were not committed") from exc
        return True

    def _harvest(self, *, block: bool) -> None:
        """Finish the batches at the head of the queue, strictly in order:
        at-least-once once the broker acknowledged all of a batch, exactly-once
        by writing the finished batches in one transaction."""
        if self.cfg.exactly_once:
            self._harvest_tx(block=block)
        else:
            while self._inflight and self._outputs(self._inflight[0], block=block) \
                    and self._acknowledged(self._inflight[0], block=block):
                b = self._inflight.popleft()
                if b.generation == self._generation:
                    # A batch that straddled a revocation was delivered, but its
                    # partitions may have moved: the next owner redoes it.
                    self.tracker.complete(b.msgs)
                self._finished(b.outs or [])
        self._gauge_depth()

    def _acknowledged(self, b: _Batch, *, block: bool) -> bool:
        """True once the broker acknowledged every message of the batch.
        Retriable failures (a broker away, a leader moving) are resent with
        backoff for as long as it takes; anything else is fatal: the batch
        stays uncommitted."""
        while True:
            if b.retry_at is not None:
                wait = b.retry_at - time.monotonic()
                if wait > 0:
                    if not block:
                        return False
                    self._check_abandon()
                    time.sleep(min(wait, 0.1))
                    continue
                b.sent, b.checked, b.retry_at = [(o, self._send(o)) for o, _ in b.sent], 0, None
            while b.checked < len(b.sent) and b.sent[b.checked][1].is_done:
                b.checked += 1
            if b.checked < len(b.sent):
                if not block:
                    return False
                self._check_abandon()
                with contextlib.suppress(Exception):  # failures are read below, once all are done
                    b.sent[b.checked][1].get(timeout=0.2)
                continue
            failed = [(o, f) for o, f in b.sent if not f.succeeded()]
            if not failed:
                return True
            for o, f in failed:
                if not getattr(f.exception, "retriable", False):
                    raise StreamError(f"the broker refused a {o.kind} message "
                                      f"({type(f.exception).__name__}): {f.exception}")
            log_event(logger, logging.WARNING, "produce_retry", unacknowledged=len(failed), backoff_s=b.backoff,
                      exc_type=type(failed[0][1].exception).__name__)
            b.sent, b.retry_at, b.backoff = failed, time.monotonic() + b.backoff, min(b.backoff * 2, 10.0)

    def _check_abandon(self) -> None:
        if self._abandon.is_set():
            raise StreamError("abandoned while results were unacknowledged")

    # -- exactly-once ------------------------------------------------------------------------------
    def _harvest_tx(self, *, block: bool) -> None:
        """Write every finished batch at the head of the queue in one
        transaction (blocking: until the queue is empty)."""
        while self._inflight:
            ready: list[_Batch] = []
            for b in self._inflight:
                if not self._outputs(b, block=block and not ready):
                    break
                ready.append(b)
            if not ready:
                return
            for _ in ready:
                self._inflight.popleft()
            self._transact(ready)
            if not block:
                return

    def _transact(self, batches: list[_Batch]) -> None:
        """The batches' outputs and their offsets in one transaction.

        On failure the transaction is aborted, and these batches and every
        later one in flight are dropped and their partitions rewound to
        their first offsets, so their records are read and processed again
        (by this member, or by the next owner after a rebalance)."""
        outs = [o for b in batches for o in b.outs or []]
        offsets = OffsetTracker.offsets_of(m for b in batches for m in b.msgs)
        tx_offsets = {KTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        records = sum(len(b.msgs) for b in batches)
        try:
            self.producer.begin_transaction()
            futures = [self.producer.send(o.topic, value=o.value, key=o.key, headers=o.headers) for o in outs]
            tm = self.producer._transaction_manager
            self._await_txn(tm.send_offsets_to_transaction(tx_offsets, self.consumer.group_metadata()), "offsets")
            self._await_txn(tm.begin_commit(), "commit")
            for f in futures:
                f.get(timeout=0)  # raises if a record failed inside the committed transaction
        except _TxnStalled as exc:
            self._m_commit_failures.inc()
            log_event(logger, logging.WARNING, "transaction_stalled", step=exc.step, records=records,
                      waited_ms=self.cfg.transaction_timeout_ms)
            self._replace_producer()
            self._discard([*batches, *self._inflight], outcome_unknown=True)
            return
        except KafkaError as exc:
            self._m_commit_failures.inc()
            log_event(logger, logging.WARNING, "transaction_aborted", exc_type=type(exc).__name__, records=records)
            try:
                self._await_txn(self.producer._transaction_manager.begin_abort(), "abort")
            except _TxnStalled:
                log_event(logger, logging.WARNING, "transaction_stalled", step="abort", records=records,
                          waited_ms=self.cfg.transaction_timeout_ms)
                self._replace_producer()
                self._discard([*batches, *self._inflight], outcome_unknown=True)
                return
            except KafkaError as exc2:
                raise StreamError(f"transaction failed and could not be aborted ({type(exc2).__name__}); "
                                  "restart: nothing of it was committed") from exc
            self._discard([*batches, *self._inflight])
            time.sleep(self.cfg.commit_retry_backoff_ms / 1000)
            return
        for b in batches:
            if b.generation == self._generation:
                self.tracker.complete(b.msgs)
        self.tracker.mark_committed(offsets)
        self._finished(outs)

    def _await_txn(self, result: Any, step: str) -> None:
        """Wait for one step of the open transaction (kafka-python's
        transactional request result), at most ``transaction_timeout_ms``
        (by then the broker aborts the transaction anyway) and never past a
        second signal.  kafka-python's own ``commit_transaction`` and
        ``send_offsets_to_transaction`` wait without a bound, and a request
        caught on a coordinator killed mid-flight can leave that wait (and
        every later produce of the producer) pending for good."""
        self.producer._sender.wakeup()
        deadline = time.monotonic() + self.cfg.transaction_timeout_ms / 1000
        while not result.wait(timeout_ms=200):
            self._check_abandon()
            if time.monotonic() >= deadline:
                raise _TxnStalled(step)

    def _replace_producer(self) -> None:
        """Exactly-once: drop a producer whose transaction is stuck and start
        another with the same transactional id; its ``init_transactions``
        fences the old one and settles its transaction: aborted, unless its
        commit had already reached the coordinator (the caller therefore
        resumes from the group's committed offsets, see :meth:`_discard`)."""
        old, self.producer = self.producer, None
        with contextlib.suppress(Exception):
            old.close(timeout=0)  # no waiting on what is stuck: force-closes its sender
        try:
            self.producer = self._new_producer()
        except KafkaError as exc:
            raise StreamError(f"could not start a new transactional producer ({type(exc).__name__}); restart: "
                              "nothing of the stuck transaction was committed") from exc
        log_event(logger, logging.INFO, "producer_replaced", reason="transaction_stalled")

    def _discard(self, batches: Sequence[_Batch], *, outcome_unknown: bool = False) -> None:
        """Exactly-once: drop batches that will not be transacted (their
        work is cancelled or ignored) and rewind their partitions, so nothing
        of them is skipped and nothing later is written before them.

        ``outcome_unknown``: the producer was replaced while a transaction
        step was pending, so its commit may have reached the coordinator
        (the new producer's fencing then completes it rather than aborting
        it).  The partitions go back to what the group has committed, as a
        restarted member would: read_committed, the broker answers that only
        once the old transaction is settled.  A transaction that did commit
        is then not written a second time."""
        first = _first_offsets(m for b in batches for m in b.msgs)
        gone = set(map(id, batches))
        self._inflight = deque(b for b in self._inflight if id(b) not in gone)
        for b in batches:
            b.work.cancel()
        if outcome_unknown:
            first = self._committed_or(first)
        self._rewind(first)

    def _committed_or(self, first: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The group's committed offset of each partition (``first``'s offset
        where the group has none yet)."""
        out = dict(first)
        try:
            for tp in first:
                off = self.consumer.committed(KTP(*tp), timeout_ms=self.cfg.transaction_timeout_ms)
                if off is not None:
                    out[tp] = off
        except KafkaError as exc:
            raise StreamError(f"could not read the group's committed offsets after a stalled transaction "
                              f"({type(exc).__name__}); restart: a restart starts from them") from exc
        return out

    def _rewind(self, first: dict[TopicPartition, int]) -> None:
        """Seek partitions back to the given offsets, dropping what was
        buffered after them; partitions no longer assigned are sought when
        they come back to this member."""
        self.batcher.revoked(first)
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for tp, off in first.items():
            if tp in assigned:
                self.consumer.seek(KTP(*tp), off)
            else:
                self._rewind_to[tp] = min(off, self._rewind_to.get(tp, off))

    # -- done --------------------------------------------------------------------------------------
    def _finished(self, outs: Sequence[OutMessage]) -> None:
        """Count and observe a batch the broker has (its outputs acknowledged
        or its transaction committed)."""
        now = time.time()
        results = 0
        for o in outs:
            if o.kind == "result":
                results += 1
            else:
                self.counts[f"dlq:{o.reason}"] += 1
                self._dlq_counter(o.reason or "unknown").inc()
            if o.source.timestamp_ms:
                self._m_e2e.observe(max(0.0, now - o.source.timestamp_ms / 1000))
        self.counts["results"] += results
        self.counts["dlq"] += len(outs) - results

    def _dlq_counter(self, reason: str) -> Any:
        child = self._m_dlq.get(reason)
        if child is None:
            child = self._m_dlq[reason] = self.metrics.dlq_records.labels(**self.labels, reason=reason)
        return child

    # -- offsets -----------------------------------------------------------------------------------
    def _commit(self, *, force: bool = False) -> None:
        if self.cfg.exactly_once:
            return  # committed inside each batch's transaction
        pending = self.tracker.pending()
        if not pending or (not force and time.monotonic() < self._next_commit):
            return
        offsets = {KTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in pending.items()}
        try:
            self.consumer.commit(offsets, timeout_ms=30_000)
        except KafkaError as exc:
            # The results are delivered; a failed commit only means they may
            # be delivered again (at-least-once).  Retry after a pause.
            self._m_commit_failures.inc()
            log_event(logger, logging.WARNING, "commit_failed", exc_type=type(exc).__name__,
                      partitions=len(offsets))
            self._next_commit = time.monotonic() + self.cfg.commit_retry_backoff_ms / 1000
            return
        self.tracker.mark_committed(pending)
        self._next_commit = time.monotonic() + self.cfg.commit_interval_ms / 1000

    # -- rebalances --------------------------------------------------------------------------------
    def revoke_prepare(self, tps: set[TopicPartition]) -> dict[Any, Any]:
        """First half of a revocation: the offsets of every acknowledged
        batch, to commit before the partitions go."""
        if not tps:
            return {}
        if self.cfg.exactly_once:
            self._generation += 1
            return {}  # offsets are in the transactions; what is in flight is dropped in on_revoked
        # Only what is already acknowledged: waiting here for the engine
        # would block kafka-python's IO thread, which its producer shares.
        self._harvest(block=False)
        self._generation += 1
        pending = self.tracker.pending()
        return {KTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in pending.items()}

    def commit_done(self, offsets: dict[Any, Any], error: BaseException | None) -> None:
        if error is None:
            self.tracker.mark_committed({(tp.topic, tp.partition): om.offset for tp, om in offsets.items()})
        else:
            self._m_commit_failures.inc()
            log_event(logger, logging.WARNING, "commit_failed", exc_type=type(error).__name__,
                      partitions=len(offsets), during="revocation")

    def on_revoked(self, tps: set[TopicPartition]) -> None:
        """Second half: drop what was fetched but not processed (exactly-once:
        also the batches in flight, which no transaction will carry now)."""
        if not tps:
            return
        if self.cfg.exactly_once and self._inflight:
            stale = list(self._inflight)
            self._inflight.clear()
            for b in stale:
                b.work.cancel()
            first = _first_offsets(m for b in stale for m in b.msgs)
            self._rewind({tp: off for tp, off in first.items() if tp not in tps})
            self._rewind_to.update({tp: off for tp, off in first.items() if tp in tps})
        for tp, off in self.batcher.first_offsets(tps).items():
            # kafka-python keeps a partition's fetch position when the same
            # member gets it back: rewind to the first record dropped here.
            self._rewind_to[tp] = min(off, self._rewind_to.get(tp, off))
        dropped = self.batcher.revoked(tps)
        self.tracker.forget(tps)
        for tp in set() if self._closing else tps & self._lag_labels:
            self._lag_labels.discard(tp)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(*self.labels.values(), tp[0], str(tp[1]))
        self.metrics.rebalances.labels(**self.labels, kind="revoked").inc()
        log_event(logger, logging.INFO, "partitions_revoked", partitions=_fmt(tps), buffered_dropped=dropped)

    def on_assigned(self, tps: set[TopicPartition]) -> None:
        self.batcher.assigned(tps)
        self._last_record = time.monotonic()  # idle time counts from owning partitions
        for tp in tps:
            off = self._rewind_to.pop(tp, None)
            if off is not None:
                self.consumer.seek(KTP(*tp), off)
        self._rewind_to.clear()
        self._next_lag = 0.0  # new partitions get a lag reading at the next step, not an interval later
        self.metrics.rebalances.labels(**self.labels, kind="assigned").inc()
        if self.bp.paused and tps:
            self.consumer.pause(*(KTP(t, p) for t, p in tps))
        self._gauge_paused()
        log_event(logger, logging.INFO, "partitions_assigned", partitions=_fmt(tps))
        self.ready.set()

    # -- backpressure, lag, gauges -----------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self.batcher) + sum(len(b.msgs) for b in self._inflight)

    def _backpressure(self) -> None:
        action = self.bp.update(self.in_flight())
        if action == "pause":
            self.consumer.pause(*self.consumer.assignment())
            log_event(logger, logging.INFO, "backpressure_pause", in_flight=self.in_flight())
        elif action == "resume":
            self.consumer.resume(*self.consumer.paused())
            log_event(logger, logging.INFO, "backpressure_resume", in_flight=self.in_flight())
        if action:
            self._gauge_paused()

    def _gauge_paused(self) -> None:
        self._m_paused.set(len(self.consumer.paused()))

    def _gauge_depth(self) -> None:
        self._m_depth.set(self.in_flight())

    def _lag(self, *, force: bool = False) -> None:
        """Lag per partition: the high watermark minus the next offset this
        member will have acknowledged (what is left to do)."""
        now = time.monotonic()
        if now < self._next_lag and not force:
            return
        for ktp in self.consumer.assignment():
            hw = self.consumer.highwater(ktp)
            if hw is None:
                continue
            tp = (ktp.topic, ktp.partition)
            base = self.tracker.done.get(tp)
            if base is None:
                # Nothing acknowledged yet in this generation: count from the
                # fetch position (everything fetched is still to do).
                base = self.batcher.first_offset(tp, default=hw)
            self.metrics.consumer_lag.labels(**self.labels, topic=tp[0], partition=str(tp[1])).set(max(0, hw - base))
            self._lag_labels.add(tp)
            # Until a fetch reported a high watermark, look again next step.
            self._next_lag = now + self.cfg.lag_interval_s


def _large_buffers_off_the_heap() -> None:
    """Allocate buffers of 128 KiB and more (large records, fetched data)
    with mmap, so they go back to the OS when freed.

    glibc raises its mmap threshold after the first such buffer is freed;
    from then on large buffers come from the heap, where the stage threads'
    interleaved lifetimes keep freed memory inside the process, and the
    resident size follows the largest burst of records instead of what the
    consumer holds (bounded by ``max_in_flight``).  A fixed threshold keeps
    it bounded; the fault suite's flood case measures it.  glibc only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # -3: M_MMAP_THRESHOLD


class _Retriable(Exception):
    retriable = True


class _TxnStalled(Exception):
    """A transaction step the producer did not finish in time."""

    def __init__(self, step: str) -> None:
        super().__init__(step)
        self.step = step


def _first_offsets(msgs: Iterable[InMessage]) -> dict[TopicPartition, int]:
    """The lowest offset per partition among ``msgs``."""
    first: dict[TopicPartition, int] = {}
    for m in msgs:
        if m.offset < first.get(m.tp, m.offset + 1):
            first[m.tp] = m.offset
    return first


def _fmt(tps: set[TopicPartition]) -> str:
    return ",".join(f"{t}:{p}" for t, p in sorted(tps))


class _Listener(AsyncConsumerRebalanceListener):
    """Rebalance hooks.  kafka-python runs them on its IO thread, where the
    blocking consumer API (``commit``) is refused, so the revocation commit
    is awaited on that loop instead: the commit of what is done happens
    before the partitions go, and the heartbeat keeps running meanwhile."""

    def __init__(self, owner: StreamConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        tps = {(tp.topic, tp.partition) for tp in revoked}
        offsets = self.owner.revoke_prepare(tps)
        if offsets:
            error: BaseException | None = None
            try:
                # kafka-python's awaitable commit (what ``commit()`` runs on the IO thread).
                await self.owner.consumer._coordinator._commit_offsets_sync_async(offsets, timeout_ms=30_000)
            except KafkaError as exc:
                error = exc
            self.owner.commit_done(offsets, error)
        self.owner.on_revoked(tps)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner.on_assigned({(tp.topic, tp.partition) for tp in assigned})
