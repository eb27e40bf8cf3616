"""Property-based fuzzing of the Kafka record path: what the stream consumer
does with whatever bytes arrive on an input topic.

The stage between the consumer and the producer (``PredictStage``) must turn
every message into exactly one output — a result, or a dead letter that
carries the original bytes untouched and a reason code — whatever the bytes:
garbage, JSON of the wrong shape, truncated or corrupt media, huge numbers,
invalid UTF-8, no value at all.  One bad message never takes its batch down.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.config import EngineConfig, Limits
from pipeline.engines import create_engine
from pipeline.errors import Reason
from pipeline.metrics import Metrics
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.records import json_safe
from pipeline.stream.stages import InMessage, PredictStage
from pipeline.tooling import sample_data

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REASONS = {r.value for r in Reason}


@pytest.fixture(scope="module")
def stage(tiny_packages: dict[str, Path]) -> PredictStage:
    pkg = load_package(tiny_packages["medical"])
    limits = Limits(max_text_chars=2000, max_record_bytes=1 << 18)
    pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="torch")), limits=limits,
                     metrics=Metrics(CollectorRegistry()), path="stream", batch_size=8)
    return PredictStage(pred, "out", "dlq")


@pytest.fixture(scope="module")
def good() -> list[dict]:
    return [json_safe(s.record) for s in sample_data.generate("medical", 4, seed=11)]


def _mutate_media(record: dict, data: st.DataObject) -> dict:
    """Cut or corrupt one of the record's base64 media fields."""
    r = dict(record)  # JSON form: media as base64 strings
    media = [k for k in ("image", "audio", "video") if isinstance(r.get(k), str)]
    if not media:
        return r
    key = data.draw(st.sampled_from(media))
    raw = base64.b64decode(r[key])
    how = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :]
    else:
        raw = data.draw(st.binary(max_size=64))
    r[key] = base64.b64encode(raw).decode()
    return r


messages = st.one_of(
    st.none(),
    st.binary(max_size=400),
    st.integers(min_value=-(10**60), max_value=10**60).map(lambda n: json.dumps({"id": "n", "text": n}).encode()),
    st.text(max_size=60).map(lambda t: json.dumps({"id": t, "workload": "medical", "text": t}).encode()),
    st.just(json.dumps({"id": "long", "workload": "medical", "text": "x" * 5000}).encode()),
    st.just(b'{"id": "u", "workload": "medical", "text": "caf\xc3\x28"}'),
)


@FUZZ
@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_every_message_gives_one_output_and_bad_ones_keep_their_bytes(
    stage: PredictStage, good: list[dict], values: list[bytes | None], data: st.DataObject
) -> None:
    if data.draw(st.booleans()):
        values.append(json.dumps(_mutate_media(data.draw(st.sampled_from(good)), data)).encode())
    values.append(json.dumps(good[0]).encode())  # a good record in every batch
    batch = [InMessage("in", 0, i, f"k{i}".encode(), v, 1_700_000_000_000) for i, v in enumerate(values)]
    outs = stage(batch)
    assert [o.source.offset for o in outs] == [m.offset for m in batch]
    for o, m in zip(outs, batch, strict=True):
        if o.kind == "dlq":
            assert o.topic == "dlq" and o.reason in REASONS
            assert o.value == m.value and o.key == m.key  # a tombstone stays null
            assert (o.reason == Reason.TOMBSTONE) == (m.value is None)
            headers = dict(o.headers)
            assert headers["mmpipe-reason"].decode() in REASONS
        else:
            assert o.topic == "out" and json.loads(o.value)["heads"]
    assert outs[-1].kind == "result"  # the good record survived its batch
