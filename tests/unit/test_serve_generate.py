"""The pure parts of generation on Serve: the thread-to-event-loop bridge
that makes streaming stream, the generate call's body and options, and the
gRPC stream's responses.  The live routes are tested in
tests/integration/test_serve_generate.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

pytest.importorskip("ray.serve", reason="the Serve application needs ray[serve]")

from deploy.serve import grpc_oip
from deploy.serve.ingress import HttpError, _generate_call, sampling_of
from deploy.serve.model import GENERATE_SPECS, thread_events
from pipeline.config import GenerateConfig
from pipeline.generate import Sampling, TokenEvent
from pipeline.oip import GENERATE_INPUTS, GENERATE_OUTPUTS, OipError, token_event_fields


async def _collect(produce, stop_after: int | None = None, on_item=None) -> list:
    got = []
    async for item in thread_events(produce):
        got.append(item)
        if on_item is not None:
            on_item(item)
        if stop_after is not None and len(got) == stop_after:
            break
    return got


def test_each_item_reaches_the_event_loop_before_the_next_is_made() -> None:
    """The producer makes its second item only once the consumer holds the
    first: a bridge that buffered the whole iterator would fail here."""
    seen = threading.Event()

    def produce() -> Iterator[int]:
        yield 1
        if not seen.wait(30):
            raise AssertionError("the first item was not handed over before the second was asked for")
        yield 2

    got = asyncio.run(asyncio.wait_for(_collect(produce, on_item=lambda _: seen.set()), 60))
    assert got == [1, 2]


def test_a_failure_in_the_thread_is_raised_to_the_consumer() -> None:
    def produce() -> Iterator[int]:
        yield 1
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        asyncio.run(_collect(produce))


def test_a_consumer_that_stops_early_stops_the_thread() -> None:
    made = []
    finished = threading.Event()

    def produce() -> Iterator[int]:
        try:
            for i in range(1000):
                made.append(i)
                yield i
                threading.Event().wait(0.001)
        finally:
            finished.set()

    assert asyncio.run(_collect(produce, stop_after=2)) == [0, 1]
    assert finished.wait(30) and len(made) < 1000


def test_generate_call_body() -> None:
    one = _generate_call(b'{"id": "a", "workload": "medical", "text": "x"}')
    assert one.single and one.records == [{"id": "a", "workload": "medical", "text": "x"}] and one.stream is None
    call = _generate_call(b'{"records": [{"id": "a"}], "max_new_tokens": 4, "stream": true, "seed": 3, "top_p": 0.9}')
    assert (call.single, call.max_new_tokens, call.stream, call.options) == (False, 4, True, {"seed": 3, "top_p": 0.9})
    for body, message in [(b"[1]", "record object"), (b'{"records": [], "stream": true}', "non-empty"),
                          (b'{"records": [{}], "beams": 2}', "unknown field 'beams'"),
                          (b'{"records": [{}], "max_new_tokens": "8"}', "integer"),
                          (b'{"records": [{}], "stream": "yes"}', "true or false"), (b"{", "not valid JSON")]:
        with pytest.raises(HttpError, match=message) as exc:
            _generate_call(body)
        assert exc.value.status == 400


def test_sampling_options_over_the_settings() -> None:
    base = GenerateConfig(temperature=0.5, top_k=3)
    assert sampling_of(base, {}) == Sampling(False, 0.5, 3, 1.0, None)
    assert sampling_of(base, {"do_sample": True, "seed": 9, "temperature": 2}) == Sampling(True, 2, 3, 1.0, 9)
    for given, message in [({"do_sample": 1}, "true or false"), ({"top_k": True}, "an integer"),
                           ({"top_k": 1.5}, "an integer"), ({"temperature": "hot"}, "a number")]:
        with pytest.raises(HttpError, match=message):
            sampling_of(base, given)


def test_stream_responses_flag_the_final_one() -> None:
    event = TokenEvent(1, "rec-1", token_id=42, text=" effusion", prompt_tokens=3)
    pick = grpc_oip.token_outputs(None)
    resp = grpc_oip.token_response("m_generate", "1", "r9", pick(event), final=False).infer_response
    assert resp.id == "r9" and resp.parameters[grpc_oip.FINAL].bool_param is False
    assert [o.name for o in resp.outputs] == [n for n, _ in GENERATE_OUTPUTS]
    final = grpc_oip.token_response("m_generate", "1", "r9", pick(event), final=True).infer_response
    assert final.parameters[grpc_oip.FINAL].bool_param is True
    empty = grpc_oip.final_response("m_generate", "1", "r9").infer_response
    assert not empty.outputs and empty.parameters[grpc_oip.FINAL].bool_param is True
    assert list(grpc_oip.token_outputs(["TEXT"])(event)) == ["TEXT"]
    with pytest.raises(OipError, match="unknown output 'LOGITS'"):
        grpc_oip.token_outputs(["LOGITS"])
    assert grpc_oip.stream_error("no").error_message == "no"


def test_token_event_round_trips_through_the_stream_tensors() -> None:
    """What Serve sends decodes back, with tritonclient's own numpy reading, to the event's JSON form."""
    import numpy as np
    from tritonclient.grpc import InferResult

    event = TokenEvent(2, "rec-2", token_id=None, text="", finish_reason="stop")
    resp = grpc_oip.token_response("m", "1", "", grpc_oip.token_outputs(None)(event), final=True).infer_response
    result = InferResult(resp)
    got = token_event_fields({n: result.as_numpy(n) for n, _ in GENERATE_OUTPUTS})
    assert got == event.as_dict()
    assert isinstance(result.as_numpy("INDEX"), np.ndarray)


def test_generate_specs_follow_the_contract() -> None:
    ins, outs = GENERATE_SPECS
    assert [(s.name, s.shape) for s in ins] == [(n, ["batch" if d == -1 else d for d in shape])
                                                for n, _, shape, _ in GENERATE_INPUTS]
    assert [s.name for s in outs] == [n for n, _ in GENERATE_OUTPUTS]
