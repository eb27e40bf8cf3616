"""A batch's results as columns, and their wire forms, produced once.

:class:`ResultBatch` is what the Predictor returns for a
:class:`~pipeline.columnar.ColumnarBatch`: per-head answers as columns
(:class:`~pipeline.postprocess.HeadColumns`), per-record timings, and every
rejected record with its reason code, all keyed by the record's position in
the input.  Each path asks it for the form it ships, by one function each:

* :meth:`ResultBatch.json_lines` — one compact JSON document per record (a
  Kafka value, a JSONL line, an element of an HTTP answer);
* :meth:`ResultBatch.to_results` — the typed :class:`~pipeline.records.Result`
  objects (the Python API; same JSON);
* :meth:`ResultBatch.dicts` — JSON-ready dicts, for a caller that embeds
  the results in a larger document.

Results come back in input order with rejected records in place, so the
caller never re-sorts or re-serialises.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from pipeline.columnar import Rejected
from pipeline.postprocess import HeadColumns, head_dicts
from pipeline.records import Result

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@dataclass
class ResultBatch:
    """Results of one batch, columnar (see the module docstring)."""

    workload: str
    model: str
    model_version: str
    engine: str | None
    provider: str | None
    ids: list[str]
    positions: np.ndarray
    heads: list[HeadColumns]
    timings: dict[str, np.ndarray]
    """stage -> milliseconds per accepted row (preprocess, infer, postprocess)"""
    rejected: Rejected = field(default_factory=Rejected)
    size: int = 0
    generated: list[dict[str, Any]] | None = None
    """per accepted row, what a generative head wrote (the ``generated``
    field of its result: text, finish reason, error); None: not asked for"""

    def __len__(self) -> int:
        return self.size

    @property
    def ok_count(self) -> int:
        return len(self.ids)

    # -- merge / split ------------------------------------------------------------------------------
    @classmethod
    def concat(cls, parts: Sequence[ResultBatch], size: int | None = None, rejected: Rejected | None = None,
               ) -> ResultBatch:
        """Results of engine chunks of one batch (positions already global)."""
        first = parts[0]
        rej = Rejected.concat([p.rejected for p in parts], [0] * len(parts))
        if rejected is not None:
            rej = Rejected.concat([rej, rejected], [0, 0])
        heads = [HeadColumns.concat([p.heads[h] for p in parts]) for h in range(len(first.heads))]
        return replace(
            first, ids=[i for p in parts for i in p.ids],
            positions=np.concatenate([p.positions for p in parts]), heads=heads,
            timings={k: np.concatenate([p.timings[k] for p in parts]) for k in first.timings},
            rejected=rej, size=size if size is not None else max(p.size for p in parts),
            generated=None if any(p.generated is None for p in parts) else
            [g for p in parts for g in p.generated or []],
        )

    @classmethod
    def merge(cls, parts: Sequence[ResultBatch]) -> ResultBatch:
        """Results of consecutive batches as one (each part's positions
        follow the previous part's); :meth:`split` undoes it."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0, *(p.size for p in parts)])[:-1].tolist()
        shifted = [replace(p, positions=p.positions + off, rejected=Rejected.concat([p.rejected], [off]))
                   for p, off in zip(parts, offsets, strict=True)]
        return cls.concat(shifted, size=int(sum(p.size for p in parts)))

    def split(self, sizes: Sequence[int]) -> list[ResultBatch]:
        """Consecutive position ranges of ``sizes`` records (undoes a merge
        of several calls' batches)."""
        out, start = [], 0
        for n in sizes:
            sel = np.flatnonzero((self.positions >= start) & (self.positions < start + n))
            rej = np.flatnonzero((self.rejected.positions >= start) & (self.rejected.positions < start + n))
            part_rej = self.rejected.take(rej)
            part_rej.positions = part_rej.positions - start
            out.append(replace(
                self, ids=[self.ids[i] for i in sel], positions=self.positions[sel] - start,
                heads=[h.take(sel) for h in self.heads], timings={k: v[sel] for k, v in self.timings.items()},
                rejected=part_rej, size=n,
                generated=[self.generated[i] for i in sel] if self.generated is not None else None,
            ))
            start += n
        return out

    # -- wire forms ----------------------------------------------------------------------------------------
    def _order(self) -> list[tuple[bool, int]]:
        """(accepted?, row) for each input position."""
        slots: list[tuple[bool, int]] = [(False, -1)] * self.size
        for row, pos in enumerate(self.positions.tolist()):
            slots[pos] = (True, row)
        for row, pos in enumerate(self.rejected.positions.tolist()):
            slots[pos] = (False, row)
        return slots

    def dicts(self) -> list[dict[str, Any]]:
        """Every record's result as a JSON-ready dict, in input order (the
        shape of :class:`~pipeline.records.Result` without its ``None`` fields)."""
        base: dict[str, Any] = {"workload": self.workload, "model": self.model, "model_version": self.model_version}
        if self.engine is not None:
            base["engine"] = self.engine
        if self.provider is not None:
            base["provider"] = self.provider
        per_head = [head_dicts(h) for h in self.heads]
        names = [h.spec.name for h in self.heads]
        stages = list(self.timings)
        times = {k: np.round(v.astype(np.float64), 3).tolist() for k, v in self.timings.items()}
        out: list[dict[str, Any]] = []
        for accepted, row in self._order():
            if accepted:
                d = {"id": self.ids[row], **base,
                     "heads": {n: per_head[j][row] for j, n in enumerate(names)},
                     "timings_ms": {k: times[k][row] for k in stages}}
                if self.generated is not None:
                    d["generated"] = self.generated[row]
            elif row >= 0:
                r = self.rejected
                d = {"id": r.ids[row], **base, "timings_ms": {},
                     "error": {"code": r.codes[row], "message": r.messages[row]}}
            else:  # a position nobody filled: a bug upstream, never a silent gap
                raise RuntimeError("result batch has a position with neither a result nor an error")
            out.append(d)
        return out

    def json_lines(self) -> list[bytes]:
        """One compact JSON document per record, in input order: the wire
        form every path ships (Kafka values, JSONL lines, HTTP answers)."""
        return [_dumps(d).encode("utf-8") for d in self.dicts()]

    def to_results(self) -> list[Result]:
        """Typed results, in input order (the Python API)."""
        return [Result.model_validate(d) for d in self.dicts()]

    def error_codes(self) -> list[str]:
        return list(self.rejected.codes)
