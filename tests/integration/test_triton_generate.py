"""Streaming generation over Triton's decoupled python model, on a real tritonserver.

The repository is written by ``exporters.triton_repo`` for the session's
``generative_package`` (medical, a briefly trained generative head exported
as ``generate-fp32``); the server (the nvidia-pytriton wheel's) loads only
``NAME_generate``.  Clients are ``tritonclient.grpc`` streams
(``start_stream`` + ``async_stream_infer``, gRPC ``ModelStreamInfer``).
Checked against in-process ``pipeline.generate.Generator`` with the same
settings:

* per record, the streamed token ids and text are the in-process ones, and
  every record gets more than one response (tokens really stream);
* a multi-turn record (``messages``) is answered as in-process;
* a rejected record gets its error event (reason code) and the others finish;
* ``MAX_NEW_TOKENS`` over the configured limit is an error naming the limit,
  and a budget under it cuts sequences (``length``) as in-process;
* the settings written into the config (``generate.max_new_tokens``) are the
  ones the model runs with;
* no record content or generated text reaches the server log.

Under ``CI=true`` a missing tritonserver / tritonclient fails the module
instead of skipping it.
"""

from __future__ import annotations

import json
import os
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration import triton_server as ts

try:
    ts.find_dist()
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
except (ts.TritonUnavailable, ImportError) as exc:  # only a missing install skips; everything else fails
    if os.environ.get("CI") == "true":
        pytest.fail(f"Triton generation tests need nvidia-pytriton and tritonclient[grpc] under CI: {exc}",
                    pytrace=False)
    pytest.skip(f"Triton generation tests need nvidia-pytriton and tritonclient[grpc]: {exc}",
                allow_module_level=True)

pytest.importorskip("onnxruntime")

from exporters.triton_repo import build_triton_repo
from pipeline.config import EngineConfig, GenerateConfig
from pipeline.generate import GenerationResult, Generator
from pipeline.oip import GENERATE_OUTPUTS, GENERATE_SUFFIX, MAX_NEW_TOKENS, RECORD, token_event_fields
from pipeline.package import ModelPackage, load_package
from pipeline.records import json_safe
from pipeline.tooling import sample_data

LIMIT = 12
"""``generate.max_new_tokens`` written into the repository (the head allows more)."""
CONFIG = GenerateConfig(max_new_tokens=LIMIT, batch_size=4)
"""The settings both sides run with; batch 4 so a request spans several decoding batches."""


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package(generative_package: Path) -> ModelPackage:
    return load_package(generative_package)


@pytest.fixture(scope="module")
def model(package: ModelPackage) -> str:
    return f"{package.name}{GENERATE_SUFFIX}"


@pytest.fixture(scope="module")
def server(package: ModelPackage, model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ts.TritonServer]:
    work = tmp_path_factory.mktemp("triton-generate")
    repo = build_triton_repo(package.root, work / "repo", instance_kind="cpu", preprocess_instance_count=1,
                             generate_config=CONFIG)
    with ts.served(ts.start_server(repo, [model], work)) as srv:
        yield srv


@pytest.fixture(scope="module")
def generator(package: ModelPackage) -> Generator:
    return Generator(package, EngineConfig(device="cpu"), CONFIG)


@pytest.fixture(scope="module")
def samples() -> list[sample_data.Sample]:
    return sample_data.generate("medical", 10, seed=31, missing_rate=0.2)


def raw(record: dict[str, Any]) -> bytes:
    return json.dumps(json_safe(record)).encode()


# -- the client --------------------------------------------------------------------------------------
@dataclass
class Streamed:
    """What one streamed request gave: its events in arrival order, and the
    request's error (a whole-call refusal) if any."""

    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def per_record(self, n: int) -> list[dict[str, Any]]:
        """Per input index: token ids, text, finish reason, error, response count."""
        out = [{"ids": [], "text": "", "finish": None, "error": None, "responses": 0} for _ in range(n)]
        for ev in self.events:
            r = out[ev["index"]]
            r["responses"] += 1
            r["text"] += ev["text"]
            if ev["token_id"] is not None:
                r["ids"].append(ev["token_id"])
            r["finish"] = ev["finish_reason"] or r["finish"]
            r["error"] = ev["error"] or r["error"]
        return out


def stream(server: ts.TritonServer, model: str, raws: list[bytes], max_new_tokens: int | None = None,
           timeout_s: float = 120.0) -> Streamed:
    """One request over gRPC ``ModelStreamInfer``, read until Triton's
    empty final response."""
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        records = grpcclient.InferInput(RECORD, [len(raws)], "BYTES")
        records.set_data_from_numpy(np.array(raws, dtype=np.object_))
        inputs = [records]
        if max_new_tokens is not None:
            budget = grpcclient.InferInput(MAX_NEW_TOKENS, [1], "INT32")
            budget.set_data_from_numpy(np.array([max_new_tokens], dtype=np.int32))
            inputs.append(budget)
        client.async_stream_infer(model, inputs, request_id="gen-1", enable_empty_final_response=True)
        out = Streamed()
        while True:
            result, error = got.get(timeout=timeout_s)
            if error is not None:
                assert isinstance(error, InferenceServerException)
                out.error = error.message()
                continue
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return out
            out.events.append(token_event_fields({name: result.as_numpy(name) for name, _ in GENERATE_OUTPUTS}))
    finally:
        client.stop_stream()
        client.close()


def assert_same(got: dict[str, Any], want: GenerationResult) -> None:
    if want.error is not None:
        assert got["error"] == {"code": want.error.code, "message": want.error.message}
        assert got["ids"] == [] and got["finish"] is None
        return
    assert got["error"] is None
    assert got["ids"] == want.token_ids
    assert got["text"] == want.text
    assert got["finish"] == want.finish_reason


# -- tests -------------------------------------------------------------------------------------------
def test_streams_the_in_process_tokens_record_by_record(server, model, generator, samples) -> None:
    raws = [raw(s.record) for s in samples]
    got = stream(server, model, raws)
    assert got.error is None
    want = generator.generate(raws)
    per = got.per_record(len(raws))
    for g, w in zip(per, want, strict=True):
        assert_same(g, w)
        assert g["responses"] > 1, "a record's tokens came in one response: nothing was streamed"
        assert g["responses"] == len(w.token_ids) + 1  # one per token, then the closing event
    assert len({w.text for w in want}) > 1, "outputs do not vary per record: an ordering mix-up would pass"
    # Tokens arrive as chosen: the first decoding step's events come before any record finishes.
    first_finish = next(i for i, ev in enumerate(got.events) if ev["finish_reason"])
    assert first_finish >= min(len(raws), CONFIG.batch_size)


def test_multi_turn_record_is_answered_in_context(server, model, generator, samples) -> None:
    s = samples[0]
    plain = raw(s.record)
    convos = [m for m, _ in sample_data.dialogues("medical", s.labels) if len(m) > 1]
    turns = [raw({**s.record, "id": f"{s.record['id']}-turn-{k}", "messages": m}) for k, m in enumerate(convos)]
    raws = [plain, *turns]
    got = stream(server, model, raws).per_record(len(raws))
    want = generator.generate(raws)
    for g, w in zip(got, want, strict=True):
        assert w.error is None
        assert_same(g, w)
    assert want[1].prompt_tokens > want[0].prompt_tokens  # the conversation reached the prompt
    # The follow-ups are answered from the conversation, not as the plain draft: a server
    # that dropped ``messages`` would give the draft's tokens and fail the comparison above.
    assert any(w.token_ids != want[0].token_ids for w in want[1:])


def test_a_rejected_record_gets_its_error_event_and_the_others_finish(server, model, generator, samples) -> None:
    good = [raw(s.record) for s in samples[:3]]
    bad_messages = raw({**samples[3].record, "messages": [{"role": "assistant", "content": "no question"}]})
    raws = [good[0], b'{"id": "broken", "text": "unterminated', good[1], bad_messages, good[2]]
    got = stream(server, model, raws)
    assert got.error is None
    want = generator.generate(raws)
    per = got.per_record(len(raws))
    assert [w.error.code if w.error else None for w in want] == [None, "bad_json", None, "bad_record", None]
    for g, w in zip(per, want, strict=True):
        assert_same(g, w)
    assert all(per[i]["finish"] in ("stop", "length") for i in (0, 2, 4))


def test_max_new_tokens_over_the_limit_is_an_error_and_under_it_cuts(server, model, generator, samples) -> None:
    raws = [raw(s.record) for s in samples[:3]]
    refused = stream(server, model, raws, max_new_tokens=LIMIT + 1)
    assert refused.events == []
    assert refused.error is not None
    assert f"max_new_tokens {LIMIT + 1} exceeds the limit of {LIMIT}" in refused.error
    got = stream(server, model, raws, max_new_tokens=2).per_record(len(raws))
    want = generator.generate(raws, max_new_tokens=2)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
        assert g["finish"] == "length" and len(g["ids"]) == 2
    zero = stream(server, model, raws, max_new_tokens=0)
    assert zero.events == [] and "max_new_tokens must be >= 1" in (zero.error or "")


def test_server_log_has_no_record_content_or_generated_text(server, model, generator, samples) -> None:
    raws = [raw(s.record) for s in samples]
    stream(server, model, raws)
    log = server.log_path.read_text(errors="replace")
    assert "mmpipe generate ready" in log  # the log is the model's, and it was read
    for s, w in zip(samples, generator.generate(raws), strict=True):
        assert w.text and w.text not in log
        text = s.record.get("text")
        if text:
            assert text[:24] not in log
        assert s.record["id"] not in log
