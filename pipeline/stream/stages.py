"""The stream's stages, each small and free of Kafka I/O so it tests alone.

    source (poll) -> MicroBatcher -> PredictStage (deserialize + predict)
        -> sink (produce OutMessages) -> OffsetTracker (what may be committed)

plus :class:`Backpressure`, which decides when the source pauses.  The
consumer in :mod:`pipeline.stream.consumer` wires them to kafka-python.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.columnar import ColumnarBatch
from pipeline.errors import Reason
from pipeline.generate import Generator, add_generated
from pipeline.predictor import Predictor
from pipeline.records import ErrorInfo, Result

TopicPartition = tuple[str, int]

# Header names on output and dead-letter messages.  Consumers of those topics
# key on them, so they are part of the interface.
H_MODEL = "mmpipe-model"
H_VERSION = "mmpipe-model-version"
H_TOPIC = "mmpipe-source-topic"
H_PARTITION = "mmpipe-source-partition"
H_OFFSET = "mmpipe-source-offset"
H_REASON = "mmpipe-reason"
H_ERROR = "mmpipe-error"


@dataclass(frozen=True)
class InMessage:
    """A consumed record, detached from the client library's type."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)

    @classmethod
    def from_kafka(cls, msg: Any) -> InMessage:
        ts = getattr(msg, "timestamp", None)
        return cls(msg.topic, msg.partition, msg.offset, msg.key, msg.value, ts if ts and ts > 0 else None)


@dataclass
class OutMessage:
    """What the sink produces for one input: a result or a dead letter."""

    kind: Literal["result", "dlq"]
    topic: str
    key: bytes | None
    value: bytes | None  # None only for the dead letter of a tombstone
    headers: list[tuple[str, bytes]]
    source: InMessage
    reason: str | None = None


class MicroBatcher:
    """Buffers polled messages and releases micro-batches.

    A batch closes at ``max_records`` or when its oldest message has waited
    ``max_wait_s``: full batches keep the engine efficient under load, the
    wait bounds latency when traffic is thin.  Offsets already seen in the
    current generation of a partition are dropped, so a partition is never
    processed twice between two rebalances (a fetch retry or a seek cannot
    feed the same offset again)."""

    def __init__(self, max_records: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_records = max_records
        self.max_wait_s = max_wait_s
        self.clock = clock
        self._buf: list[InMessage] = []
        self._since: float | None = None
        self._next: dict[TopicPartition, int] = {}

    def __len__(self) -> int:
        return len(self._buf)

    def add(self, messages: Iterable[InMessage]) -> int:
        """Buffer messages; returns how many were duplicates and dropped."""
        dropped = 0
        for m in messages:
            nxt = self._next.get(m.tp)
            if nxt is not None and m.offset < nxt:
                dropped += 1
                continue
            self._next[m.tp] = m.offset + 1
            if not self._buf:
                self._since = self.clock()
            self._buf.append(m)
        return dropped

    def ready(self) -> bool:
        if not self._buf:
            return False
        return len(self._buf) >= self.max_records or self.clock() - (self._since or 0.0) >= self.max_wait_s

    def time_left(self) -> float:
        """Seconds until the current batch closes on time (inf when empty)."""
        if not self._buf:
            return float("inf")
        if len(self._buf) >= self.max_records:
            return 0.0
        return max(0.0, self.max_wait_s - (self.clock() - (self._since or 0.0)))

    def take(self) -> list[InMessage]:
        batch, self._buf = self._buf[: self.max_records], self._buf[self.max_records :]
        self._since = self.clock() if self._buf else None
        return batch

    def first_offset(self, tp: TopicPartition, default: int) -> int:
        """The oldest offset of ``tp`` not yet handed out in a batch (or
        ``default`` when none is buffered)."""
        for m in self._buf:
            if m.tp == tp:
                return m.offset
        return default

    def first_offsets(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The oldest buffered offset of each of ``tps`` that has buffered messages."""
        want = set(tps)
        out: dict[TopicPartition, int] = {}
        for m in self._buf:
            if m.tp in want and m.offset < out.get(m.tp, m.offset + 1):
                out[m.tp] = m.offset
        return out

    def assigned(self, tps: Iterable[TopicPartition]) -> None:
        """A new generation: positions restart from the committed offsets."""
        for tp in tps:
            self._next.pop(tp, None)

    def revoked(self, tps: Iterable[TopicPartition]) -> int:
        """Forget revoked partitions; returns how many buffered messages were
        dropped (their offsets are not committed, so the next owner gets them)."""
        gone = set(tps)
        before = len(self._buf)
        self._buf = [m for m in self._buf if m.tp not in gone]
        for tp in gone:
            self._next.pop(tp, None)
        if not self._buf:
            self._since = None
        return before - len(self._buf)


TOMBSTONE_MESSAGE = "message has a null value (a tombstone), not a record"


@dataclass
class Decoded:
    """A micro-batch after its decode half: the non-null values as one
    columnar batch, and where each of them (and each tombstone) sits in the
    micro-batch."""

    msgs: Sequence[InMessage]
    columns: ColumnarBatch
    kept: list[int]  # micro-batch index of each decoded value, in columnar position order
    tombstones: list[int]  # micro-batch index of each null value


class PredictStage:
    """Deserialize + predict: a micro-batch of messages in, one OutMessage per
    message out, in input order.  Rejected records become dead letters that
    carry the original bytes, the source coordinates and the reason code.

    Two halves, :meth:`decode` (into the columnar batch) and :meth:`finish`
    (engine, postprocessing and the results' wire form, made once for the
    batch), so the consumer decodes one batch while the engine runs the
    previous one; calling the stage runs both."""

    def __init__(self, predictor: Predictor, output_topic: str, dlq_topic: str,
                 generator: Generator | None = None) -> None:
        """``generator``: with ``generate.enabled``, each result also carries
        what the generative head wrote for the record (its ``generated`` field)."""
        self.predictor = predictor
        self.generator = generator
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        pkg = predictor.package
        self._model = [(H_MODEL, pkg.name.encode()), (H_VERSION, pkg.version.encode())]
        self._topics: dict[str, bytes] = {}

    def __call__(self, batch: Sequence[InMessage]) -> list[OutMessage]:
        return self.finish(self.decode(batch))

    def decode(self, batch: Sequence[InMessage]) -> Decoded:
        """Validate and decode every message (the CPU-heavy half)."""
        kept: list[int] = []
        tombstones: list[int] = []
        values: list[bytes] = []
        for i, m in enumerate(batch):
            if m.value is None:
                tombstones.append(i)
            else:
                kept.append(i)
                values.append(m.value)
        for _ in tombstones:  # counted and logged like every rejected record
            self.predictor.error_result(None, Reason.TOMBSTONE, TOMBSTONE_MESSAGE)
        return Decoded(batch, self.predictor.decode(values), kept, tombstones)

    def finish(self, decoded: Decoded) -> list[OutMessage]:
        """Run the engine on the decoded records; results in their wire form
        (one JSON document each, encoded once for the whole batch), records
        rejected on the way (or by the engine) as dead letters."""
        msgs, kept = decoded.msgs, decoded.kept
        slots: list[OutMessage | None] = [None] * len(msgs)
        for i in decoded.tombstones:
            slots[i] = self.dead_letter(msgs[i], Reason.TOMBSTONE.value, TOMBSTONE_MESSAGE)
        if kept:
            results = self.predictor.infer_batch(decoded.columns)
            if self.generator is not None:
                results = add_generated(self.generator, decoded.columns, results)
            lines = results.json_lines()
            rej = results.rejected
            for pos, code, message in zip(rej.positions.tolist(), rej.codes, rej.messages, strict=True):
                slots[kept[pos]] = self.dead_letter(msgs[kept[pos]], code, message)
            for pos, rid in zip(results.positions.tolist(), results.ids, strict=True):
                m = msgs[kept[pos]]
                slots[kept[pos]] = OutMessage("result", self.output_topic, rid.encode(), lines[pos],
                                              self._model + self._source(m), m)
        if any(s is None for s in slots):  # a bug upstream, never a silently dropped message
            raise RuntimeError("a message got neither a result nor a dead letter")
        return slots  # type: ignore[return-value]

    @property
    def labels(self) -> dict[str, str]:
        return {"path": self.predictor.path, "workload": self.predictor.spec.name, "model": self.predictor.package.name}

    def _source(self, m: InMessage) -> list[tuple[str, bytes]]:
        topic = self._topics.get(m.topic)
        if topic is None:
            topic = self._topics[m.topic] = m.topic.encode()
        return [(H_TOPIC, topic), (H_PARTITION, str(m.partition).encode()), (H_OFFSET, str(m.offset).encode())]

    def dead_letter(self, m: InMessage, code: str, message: str) -> OutMessage:
        """The input's key and value as they came (a tombstone stays null),
        the reason in the headers."""
        # The error message describes sizes and formats only, never content.
        headers = [(H_REASON, code.encode()), (H_ERROR, message.encode()), *self._model, *self._source(m)]
        return OutMessage("dlq", self.dlq_topic, m.key, m.value, headers, m, reason=code)


def result_of_message(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]] | None, *,
                      dead_letter: bool) -> Result:
    """The :class:`Result` an output or dead-letter message stands for: the
    inverse of :meth:`PredictStage.finish` and :meth:`PredictStage.dead_letter`,
    so a reader of those topics (``mmpipe verify``, a test) gets what every
    other path returns.  A dead letter's record id is its key (the input's
    key: producers key records by id); its reason code and message come from
    the headers, never from the record bytes it carries."""
    if not dead_letter:
        if value is None:
            raise ValueError("a result message without a value")
        return Result.model_validate_json(value)
    h = {k: v.decode("utf-8", "replace") for k, v in headers or []}
    return Result(id=key.decode("utf-8", "replace") if key else "", model=h.get(H_MODEL, ""),
                  model_version=h.get(H_VERSION, ""),
                  error=ErrorInfo(code=h.get(H_REASON, ""), message=h.get(H_ERROR, "")))


@dataclass
class OffsetTracker:
    """Which offsets may be committed: per partition, one past the last
    message whose output the broker acknowledged.  Batches complete in the
    order they were taken, so the latest completion is the commit point."""

    done: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)

    def complete(self, batch: Iterable[InMessage]) -> None:
        for m in batch:
            if m.offset + 1 > self.done.get(m.tp, -1):
                self.done[m.tp] = m.offset + 1

    @staticmethod
    def offsets_of(batch: Iterable[InMessage]) -> dict[TopicPartition, int]:
        out: dict[TopicPartition, int] = {}
        for m in batch:
            out[m.tp] = max(out.get(m.tp, 0), m.offset + 1)
        return out

    def pending(self) -> dict[TopicPartition, int]:
        """Offsets done but not yet committed."""
        return {tp: off for tp, off in self.done.items() if self.committed.get(tp) != off}

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            if off > self.committed.get(tp, -1):
                self.committed[tp] = off

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.done.pop(tp, None)
            self.committed.pop(tp, None)


class Backpressure:
    """Pause fetching above ``max_in_flight`` records, resume below half of it.

    The gap between the two marks keeps the consumer from flapping between
    pause and resume on every poll."""

    def __init__(self, max_in_flight: int) -> None:
        self.high = max_in_flight
        self.low = max(max_in_flight // 2, 0)
        self.paused = False

    def update(self, in_flight: int) -> Literal["pause", "resume"] | None:
        if not self.paused and in_flight >= self.high:
            self.paused = True
            return "pause"
        if self.paused and in_flight <= self.low:
            self.paused = False
            return "resume"
        return None
