"""Dynamic batching on the replica's event loop: concurrent calls merged into
one engine call, the batch formed when the engine is free.

Ray Serve's ``@serve.batch`` forms batches by the clock: a batch closes
``batch_wait_timeout_s`` after its first call, whether or not the engine
can take it, and waits its turn behind the batch that is running.  Under
load that makes many small batches (a mean of about 7 calls at 64 clients
on the small model, bench/NOTES.md), and a lone client waits the whole
timeout on every call.  :class:`Batcher` forms a batch when the engine
is free instead, from every call queued by then (up to ``max_batch_size``),
so batches grow with the load; and it waits for more only for calls that
are already inside the server (announced by :meth:`Batcher.arrival` when a
request is taken, handed in by :meth:`Batcher.submit` once it is parsed),
never for calls that may or may not come: one client is answered at once.

Everything here runs on the one event loop (no locks); ``run`` is the
engine call, which itself hands the work to a thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Arrival:
    """A call on its way to a batcher (its request is being read or parsed).
    Closed when the call is submitted, or when it fails before that; a
    ``with`` block closes it on every way out."""

    __slots__ = ("_batcher", "_open")

    def __init__(self, batcher: Batcher | None) -> None:
        self._batcher = batcher
        self._open = batcher is not None
        if batcher is not None:
            batcher._arriving += 1

    def close(self) -> None:
        if self._open and self._batcher is not None:
            self._open = False
            self._batcher._arriving -= 1
            self._batcher._wake.set()

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NO_ARRIVAL = Arrival(None)
"""The arrival of a call no batcher takes (generation, a rejected request)."""


class Batcher(Generic[T, R]):
    """Merges concurrent :meth:`submit` calls into one ``run(items)`` (which
    returns one result per item, in order), one batch at a time.

    A batch is formed when the previous one is done: every queued call, up
    to ``max_batch_size``.  While it is smaller than that and calls that
    were announced (:meth:`arrival`) have not been submitted yet, it waits
    for them, ``wait_s`` at most.  ``max_batch_size=1`` runs calls one by
    one.  A call whose caller went away (its future cancelled) is still run
    with its batch, and its result dropped."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int, wait_s: float) -> None:
        self._run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._arriving = 0
        self._wake = asyncio.Event()
        self._draining: asyncio.Task[None] | None = None

    def configure(self, max_batch_size: int, wait_s: float) -> None:
        """New limits, from the next batch on (live reconfiguration)."""
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s

    def arrival(self) -> Arrival:
        return Arrival(self)

    async def submit(self, item: T, arrival: Arrival = NO_ARRIVAL) -> R:
        """``item``'s result, once the batch it joined has run."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        arrival.close()  # after the append: a waiting batch sees the call, not a gap
        self._wake.set()
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _gather(self) -> None:
        """Wait for announced calls while the batch can still grow."""
        deadline = time.monotonic() + self.wait_s
        while len(self._queue) < self.max_batch_size and self._arriving > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self.max_batch_size > 1 and self.wait_s > 0:
                    await self._gather()
                n = min(len(self._queue), self.max_batch_size)
                taken = [self._queue.popleft() for _ in range(n)]
                try:
                    results = await self._run([item for item, _ in taken])
                except BaseException as exc:  # every call of the batch gets the failure
                    for _, fut in taken:
                        if not fut.done():
                            fut.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), result in zip(taken, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._draining = None
