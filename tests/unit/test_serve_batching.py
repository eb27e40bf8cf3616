"""The server's batcher: batches form when the engine is free, wait only for
calls already inside the server, and every call gets its own result."""

from __future__ import annotations

import asyncio

import pytest

from deploy.serve.batching import Batcher


class _Engine:
    def __init__(self, seconds: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.seconds, self.fail = seconds, fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("engine down")
        return [i * 10 for i in items]


def test_a_lone_call_runs_at_once_without_waiting_the_timeout() -> None:
    async def go() -> list[list[int]]:
        engine = _Engine()
        b = Batcher(engine, max_batch_size=8, wait_s=3600.0)
        # Nobody else announced: answered without the hour's wait (else the liveness guard fires).
        assert await asyncio.wait_for(b.submit(3), 60) == 30
        return engine.batches

    assert asyncio.run(go()) == [[3]]


def test_calls_queued_while_the_engine_runs_form_the_next_batch() -> None:
    async def go() -> tuple[list[list[int]], list[int]]:
        engine = _Engine()
        release = asyncio.Event()
        run = engine.__call__

        async def held(items: list[int]) -> list[int]:  # the first batch holds the engine until released
            if not engine.batches:
                engine.batches.append(list(items))
                await release.wait()
                return [i * 10 for i in items]
            return await run(items)

        b = Batcher(held, max_batch_size=4, wait_s=0.0)
        first = asyncio.ensure_future(b.submit(0))
        while not engine.batches:  # the engine is busy with [0]
            await asyncio.sleep(0)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0)
        release.set()
        return engine.batches, await asyncio.gather(first, *rest)

    batches, results = asyncio.run(go())
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]  # formed when the engine freed, capped at 4
    assert results == [i * 10 for i in range(7)]


def test_a_batch_waits_for_announced_calls_only_until_they_arrive() -> None:
    async def go() -> list[list[int]]:
        engine = _Engine()
        b = Batcher(engine, max_batch_size=8, wait_s=3600.0)
        late = b.arrival()

        async def announced() -> int:
            await asyncio.sleep(0.05)  # still being read when the first call is submitted
            return await b.submit(2, late)

        got = await asyncio.gather(b.submit(1), announced())
        assert got == [10, 20]
        return engine.batches

    assert asyncio.run(go()) == [[1, 2]]


def test_an_abandoned_arrival_stops_the_wait_and_a_failure_reaches_every_call() -> None:
    async def go() -> None:
        b = Batcher(_Engine(fail=True), max_batch_size=8, wait_s=3600.0)
        gone = b.arrival()
        asyncio.get_running_loop().call_later(0.05, gone.close)  # a request that failed parsing
        calls = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        for c in calls:
            with pytest.raises(RuntimeError, match="engine down"):
                await c

    asyncio.run(asyncio.wait_for(go(), 60))  # liveness guard: the abandoned arrival must end the wait


def test_max_batch_size_one_runs_calls_one_by_one_and_configure_applies_next_batch() -> None:
    async def go() -> list[list[int]]:
        engine = _Engine(seconds=0.01)
        b = Batcher(engine, max_batch_size=1, wait_s=1.0)
        await asyncio.gather(*(b.submit(i) for i in range(3)))
        b.configure(3, 0.0)
        await asyncio.gather(*(b.submit(i) for i in range(3, 6)))
        return engine.batches

    assert asyncio.run(go()) == [[0], [1], [2], [3, 4, 5]]
