"""The engine interface: named numpy tensors in, named numpy tensors out.

Engines know nothing of records or labels; the Predictor does the rest.  A
new engine (ONNX Runtime, Triton, ...) only has to map the package's
signature onto its runtime.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


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
