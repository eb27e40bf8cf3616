"""The engine interface: named numpy tensors in, named numpy tensors out.

Engines know nothing of records or labels; the Predictor does the rest.  A
new engine (ONNX Runtime, Triton, ...) only has to map the package's
signature onto its runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

T = TypeVar("T")


class EngineUnavailable(RuntimeError):
    """The engine cannot be reached (its own retries are spent).  The records
    are not at fault, so the Predictor does not retry them one by one."""


@runtime_checkable
class Engine(Protocol):
    name: str
    """engine kind: ``torch``, ``onnxruntime``, ``triton``"""
    provider: str
    """what actually runs the math (``cpu``, ``cuda``, ``CUDAExecutionProvider``...)"""

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch.  ``feeds`` follows the package signature's inputs;
        the result holds one array per signature output."""
        ...

    def close(self) -> None: ...


class Isolated:
    """Why :func:`run_isolated` gave up on a group of rows."""

    UNAVAILABLE = "unavailable"
    """the engine cannot be reached: the whole chunk fails, no retries"""
    FAILED = "failed"
    """the engine failed on this row alone"""


def run_isolated(run: Callable[[list[int]], T], rows: int,
                 on_error: Callable[[BaseException, int], None] | None = None) -> list[tuple[list[int], T | str]]:
    """Run ``rows`` rows (records, or whole calls) through ``run`` as one
    group; if the engine fails, retry each row alone so one bad row cannot
    fail the others, except when the engine is unavailable
    (:class:`EngineUnavailable`), which fails every remaining row at once.

    Returns ``(row indices, output or an Isolated reason)`` groups, in order.
    The single home of mmpipe's record-isolation rule: the Predictor and the
    online server's tensor calls both use it."""
    everything = list(range(rows))
    if rows == 0:
        return []
    try:
        return [(everything, run(everything))]
    except EngineUnavailable as exc:
        if on_error:
            on_error(exc, rows)
        return [(everything, Isolated.UNAVAILABLE)]
    except Exception as exc:
        if on_error:
            on_error(exc, rows)
        if rows == 1:
            return [(everything, Isolated.FAILED)]
    out: list[tuple[list[int], T | str]] = []
    for i in everything:
        try:
            out.append(([i], run([i])))
        except EngineUnavailable as exc:
            if on_error:
                on_error(exc, rows - i)
            out.append((everything[i:], Isolated.UNAVAILABLE))
            break
        except Exception as exc:
            if on_error:
                on_error(exc, 1)
            out.append(([i], Isolated.FAILED))
    return out
