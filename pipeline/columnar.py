"""The columnar batch: the one thing that crosses every boundary.

Records are decoded one at a time (a JPEG is a JPEG), but from the moment a
record is decoded it lives as one row of a :class:`ColumnarBatch`: numpy
columns for ids, features by name, presence per modality, token counts and
character offsets, plus the records rejected on the way with their reason
codes.  Ray Data blocks, the Serve replica's batcher merges, the Triton
python-backend models and Kafka micro-batches all carry this type (or its
block form, :meth:`ColumnarBatch.to_block`), so there is one padding rule,
one collate, one merge and one split:

* **padding** (:func:`pad_concat`): a variable axis (text length) is padded
  to the longest row with the pad value; models whose graph has no attention
  mask are always padded to their fixed length instead (``fixed_length``),
  so a record's answer never depends on its neighbours;
* **collate** (:meth:`ColumnarBatch.from_prepared`, :class:`BatchBuilder`):
  decoded rows into columns, once;
* **merge** (:meth:`ColumnarBatch.merge`) and **split**
  (:meth:`ColumnarBatch.split`), which keep each record's position in the
  input so results come back in input order, rejected records in place.

Graph feeds (the package signature's names and dtypes) are produced at the
very end by :meth:`ColumnarBatch.feeds`; the columns themselves keep
mmpipe's canonical feature names.  Nothing here pickles or copies a record:
the raw record (possibly patient data) is gone once it is decoded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.preprocess import Prepared

TEXT = "input_ids"
"""Canonical name of the token-id column (the only variable-length one)."""
FIXED_FEATURES = ("pixel_values", "audio_features", "tabular")


# -- the one padding rule --------------------------------------------------------------------------
def pad_to(arr: np.ndarray, axis: int, length: int, value: int | float = 0) -> np.ndarray:
    """``arr`` with ``axis`` padded (at the end) to ``length`` with ``value``;
    the array itself when it is already that long."""
    have = arr.shape[axis]
    if have >= length:
        return arr
    pads = [(0, 0)] * arr.ndim
    pads[axis] = (0, length - have)
    return np.pad(arr, pads, constant_values=value)


def pad_concat(
    arrays: Sequence[np.ndarray], var_axes: Sequence[int] = (), value: int | float = 0,
    lengths: dict[int, int] | None = None,
) -> np.ndarray:
    """Concatenate along the batch axis, each of ``var_axes`` padded to the
    longest part (or to ``lengths[axis]`` when given).  The single padding
    rule of mmpipe: collate, merges of calls and merges of batches use it.

    The result is allocated once and each part copied into its place: a
    server merging 64 one-row calls pays one allocation, not 64 ``np.pad``
    copies and a concatenation.  Fixed axes must agree (``ValueError``
    otherwise, as ``np.concatenate`` says)."""
    if not arrays:
        raise ValueError("nothing to concatenate")
    first = arrays[0]
    shape = list(first.shape)
    for ax in var_axes:
        shape[ax] = (lengths or {}).get(ax, max(a.shape[ax] for a in arrays))
    if len(arrays) == 1 and tuple(shape) == first.shape:
        return first
    var = set(var_axes)
    for a in arrays:
        if a.ndim != first.ndim or any(a.shape[ax] != shape[ax] for ax in range(1, a.ndim) if ax not in var):
            raise ValueError(f"cannot concatenate shapes {first.shape} and {a.shape} on axis 0")
        if any(a.shape[ax] > shape[ax] for ax in var):
            raise ValueError(f"part of shape {a.shape} is longer than the padded shape {tuple(shape)}")
    shape[0] = sum(a.shape[0] for a in arrays)
    dtype = np.result_type(*arrays)
    ragged = any(a.shape[ax] != shape[ax] for a in arrays for ax in var)
    out = np.full(shape, value, dtype=dtype) if ragged else np.empty(shape, dtype=dtype)
    row = 0
    for a in arrays:
        n = a.shape[0]
        out[(slice(row, row + n), *(slice(0, d) for d in a.shape[1:]))] = a
        row += n
    return out


def cut_rows(arr: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """Split along the batch axis into consecutive parts of ``sizes`` rows."""
    bounds = np.cumsum([0, *sizes])
    return [arr[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]


# -- rejected records ----------------------------------------------------------------------------------
@dataclass
class Rejected:
    """Records refused on the way (bad JSON, over a limit, undecodable),
    with their position in the input and their reason code."""

    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    ids: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, position: int, rid: str | None, code: str, message: str) -> None:
        self.positions = np.append(self.positions, np.int64(position))
        self.ids.append(rid or "")
        self.codes.append(code)
        self.messages.append(message)

    def take(self, index: np.ndarray | Sequence[int]) -> Rejected:
        idx = np.asarray(index, dtype=np.int64)
        return Rejected(self.positions[idx], [self.ids[i] for i in idx], [self.codes[i] for i in idx],
                        [self.messages[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence[Rejected], offsets: Sequence[int]) -> Rejected:
        return Rejected(
            np.concatenate([p.positions + off for p, off in zip(parts, offsets, strict=True)])
            if parts else np.zeros(0, dtype=np.int64),
            [i for p in parts for i in p.ids], [c for p in parts for c in p.codes],
            [m for p in parts for m in p.messages],
        )


# -- the batch ------------------------------------------------------------------------------------------------
@dataclass
class ColumnarBatch:
    """Decoded records as columns (see the module docstring).

    ``ids``, ``positions``, ``presence``, ``preprocess_ms`` and every feature
    have one row per accepted record; ``size`` counts every record of the
    input (accepted plus ``rejected``), whose rows are numbered by
    ``positions`` / ``rejected.positions`` from 0 to ``size - 1``."""

    workload: str
    modalities: tuple[str, ...]
    ids: list[str]
    positions: np.ndarray
    features: dict[str, np.ndarray]
    presence: np.ndarray
    preprocess_ms: np.ndarray
    lengths: np.ndarray | None = None
    """tokens per row, when the model reads text"""
    offsets: np.ndarray | None = None
    """``[rows, seq, 2]`` character span of every token, (0, 0) for special and pad tokens"""
    rejected: Rejected = field(default_factory=Rejected)
    size: int = 0
    pad_id: int = 0
    fixed_length: int | None = None
    """pad text to exactly this many tokens (models without an attention mask)"""
    messages: list[list[dict[str, str]] | None] | None = None
    """each row's conversation for a generative head (None: no row has one)"""

    def __len__(self) -> int:
        return len(self.ids)

    # -- building ----------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, workload: str, modalities: Sequence[str], *, pad_id: int = 0,
              fixed_length: int | None = None) -> ColumnarBatch:
        return cls(workload, tuple(modalities), [], np.zeros(0, dtype=np.int64), {},
                   np.zeros((0, len(modalities)), dtype=np.float32), np.zeros(0, dtype=np.float32),
                   pad_id=pad_id, fixed_length=fixed_length)

    @classmethod
    def from_prepared(
        cls, prepared: Sequence[Prepared], *, workload: str, modalities: Sequence[str],
        shapes: dict[str, tuple[int, ...]], text: bool, pad_id: int = 0, fixed_length: int | None = None,
        positions: Sequence[int] | None = None, rejected: Rejected | None = None, size: int | None = None,
    ) -> ColumnarBatch:
        """Collate decoded rows.  ``shapes``: per-row shape of each fixed
        feature the model takes (a row without it gets zeros)."""
        b = BatchBuilder(workload, modalities, shapes, text=text, pad_id=pad_id, fixed_length=fixed_length,
                         capacity=len(prepared))
        pos = range(len(prepared)) if positions is None else positions
        for p, i in zip(prepared, pos, strict=True):
            b.add(p, int(i))
        out = b.build()
        if rejected is not None:
            out.rejected = rejected
        out.size = size if size is not None else len(out) + len(out.rejected)
        return out

    # -- merge / split ------------------------------------------------------------------------------------
    @classmethod
    def merge(cls, batches: Sequence[ColumnarBatch]) -> ColumnarBatch:
        """One batch of several (Serve's merged calls, an actor's blocks);
        positions are renumbered so the parts follow each other, and
        :meth:`split` with ``sizes()`` undoes it."""
        if not batches:
            raise ValueError("nothing to merge")
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        offsets = np.cumsum([0, *(b.size for b in batches)])[:-1].tolist()
        feats: dict[str, np.ndarray] = {}
        for name in first.features:
            var = (1,) if name == TEXT else ()
            feats[name] = pad_concat([b.features[name] for b in batches], var,
                                     first.pad_id if name == TEXT else 0)
        offs = None
        if first.offsets is not None:
            offs = pad_concat([b.offsets for b in batches if b.offsets is not None], (1,), 0)
        return replace(
            first,
            ids=[i for b in batches for i in b.ids],
            positions=np.concatenate([b.positions + off for b, off in zip(batches, offsets, strict=True)]),
            features=feats,
            presence=np.concatenate([b.presence for b in batches]),
            preprocess_ms=np.concatenate([b.preprocess_ms for b in batches]),
            lengths=np.concatenate([b.lengths for b in batches]) if first.lengths is not None else None,
            offsets=offs,
            rejected=Rejected.concat([b.rejected for b in batches], offsets),
            size=int(sum(b.size for b in batches)),
            messages=None if all(b.messages is None for b in batches) else
            [m for b in batches for m in (b.messages if b.messages is not None else [None] * len(b))],
        )

    def split(self, sizes: Sequence[int]) -> list[ColumnarBatch]:
        """The inverse of :meth:`merge`: consecutive position ranges of
        ``sizes`` records each, positions renumbered from 0."""
        out = []
        start = 0
        for n in sizes:
            sel = np.flatnonzero((self.positions >= start) & (self.positions < start + n))
            rej = np.flatnonzero((self.rejected.positions >= start) & (self.rejected.positions < start + n))
            part = self.take(sel)
            part.positions = part.positions - start
            part.rejected = self.rejected.take(rej)
            part.rejected.positions = part.rejected.positions - start
            part.size = n
            out.append(part)
            start += n
        return out

    def take(self, rows: np.ndarray | Sequence[int] | slice) -> ColumnarBatch:
        """Accepted rows ``rows`` (no rejected records; ``size`` unchanged)."""
        idx = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = replace(
            self, ids=[self.ids[i] for i in idx], positions=self.positions[idx],
            features={k: v[idx] for k, v in self.features.items()}, presence=self.presence[idx],
            preprocess_ms=self.preprocess_ms[idx], lengths=self.lengths[idx] if self.lengths is not None else None,
            offsets=self.offsets[idx] if self.offsets is not None else None, rejected=Rejected(),
            messages=[self.messages[i] for i in idx] if self.messages is not None else None,
        )
        out._trim()
        return out

    def _trim(self) -> None:
        """Drop text padding that no row needs (padding is added back, by
        the one rule, where rows meet others)."""
        if self.lengths is None or TEXT not in self.features or not len(self):
            return
        longest = max(int(self.lengths.max()), 1)
        if self.features[TEXT].shape[1] > longest:
            self.features = {**self.features, TEXT: self.features[TEXT][:, :longest]}
            if self.offsets is not None:
                self.offsets = self.offsets[:, :longest]

    def chunks(self, batch_size: int) -> Iterable[ColumnarBatch]:
        """Engine-sized pieces of the accepted rows."""
        for start in range(0, len(self), max(1, batch_size)):
            yield self.take(slice(start, start + batch_size))

    def sizes(self) -> list[int]:
        return [self.size]

    def rows(self) -> list[Prepared]:
        """The accepted rows as :class:`~pipeline.preprocess.Prepared` again
        (the inverse of the collate; a missing modality's zeros are kept,
        which collating again gives anyway), for a consumer that takes
        records one by one: the generator, which pads its own batches."""
        from pipeline.preprocess import Prepared

        out = []
        for i, rid in enumerate(self.ids):
            feats = {k: v[i] for k, v in self.features.items() if k != TEXT}
            offsets: list[tuple[int, int]] = []
            if TEXT in self.features and self.lengths is not None:
                n = int(self.lengths[i])
                feats[TEXT] = self.features[TEXT][i, :n]
                if self.offsets is not None:
                    offsets = [(int(a), int(b)) for a, b in self.offsets[i, :n]]
            present = {m: bool(self.presence[i, j]) for j, m in enumerate(self.modalities)}
            out.append(Prepared(rid, self.workload, feats, present, offsets, float(self.preprocess_ms[i]),
                                self.messages[i] if self.messages is not None else None))
        return out

    # -- to the engine ---------------------------------------------------------------------------------------
    def canonical(self) -> dict[str, np.ndarray]:
        """Model inputs under mmpipe's own names (``input_ids``,
        ``attention_mask``, ``pixel_values``, ..., ``presence``)."""
        out = dict(self.features)
        if TEXT in out and self.lengths is not None:
            ids = out[TEXT]
            if self.fixed_length is not None:
                ids = pad_to(ids, 1, self.fixed_length, self.pad_id)[:, : self.fixed_length]
                out[TEXT] = ids
            out["attention_mask"] = (np.arange(ids.shape[1])[None, :] < self.lengths[:, None]).astype(np.int64)
        out["presence"] = self.presence
        return out

    def row_ids(self) -> np.ndarray:
        """Every input record's id in position order, accepted or rejected."""
        ids = np.empty(self.size, dtype=object)
        ids[self.positions] = self.ids
        ids[self.rejected.positions] = self.rejected.ids
        return ids

    # -- block form (Ray Data, Arrow) ------------------------------------------------------------------------
    def to_block(self, max_length: int | None = None, *, messages: bool = False) -> dict[str, np.ndarray]:
        """Numpy columns, one row per input record in position order
        (rejected records as rows with their reason and zero features), as a
        Ray Data block.  Text is padded to ``max_length`` (a fixed width, so
        blocks of different batches stack without per-row objects).
        ``messages``: add each row's conversation as JSON text ("" for none),
        for a generative head downstream."""
        n = self.size
        order = np.full(n, -1, dtype=np.int64)
        order[self.positions] = np.arange(len(self))
        ok = order >= 0
        src = np.where(ok, order, 0)
        out: dict[str, np.ndarray] = {}
        ids = self.row_ids()
        code = np.full(n, "", dtype=object)
        msg = np.full(n, "", dtype=object)
        code[self.rejected.positions] = self.rejected.codes
        msg[self.rejected.positions] = self.rejected.messages
        out.update(id=ids, error_code=code, error_message=msg)

        def rows(arr: np.ndarray) -> np.ndarray:
            if not len(self):
                return np.zeros((n, *arr.shape[1:]), dtype=arr.dtype)
            got = arr[src]
            got[~ok] = 0
            return got

        out["presence"] = rows(self.presence)
        out["preprocess_ms"] = rows(self.preprocess_ms)
        for name, arr in self.features.items():
            if name == TEXT:
                arr = pad_to(arr, 1, max_length or arr.shape[1], self.pad_id)
                padded = rows(arr)
                padded[~ok] = self.pad_id
                out[name] = padded
            else:
                out[name] = rows(arr)
        if self.lengths is not None:
            out["n_tokens"] = rows(self.lengths)
        if self.offsets is not None:
            out["offsets"] = rows(pad_to(self.offsets, 1, max_length or self.offsets.shape[1], 0))
        if messages:
            conv = np.full(n, "", dtype=object)
            for row, m in zip(self.positions.tolist(), self.messages or [], strict=False):
                conv[row] = json.dumps(m) if m else ""
            out["messages"] = conv
        return out

    @classmethod
    def from_block(
        cls, block: dict[str, Any], *, workload: str, modalities: Sequence[str], pad_id: int = 0,
        fixed_length: int | None = None,
    ) -> ColumnarBatch:
        """The inverse of :meth:`to_block` (a Ray Data batch in numpy format)."""
        codes = np.asarray(block["error_code"], dtype=object)
        n = len(codes)
        ok = np.array([not c for c in codes], dtype=bool)
        sel = np.flatnonzero(ok)
        bad = np.flatnonzero(~ok)
        ids = np.asarray(block["id"], dtype=object)
        feats = {k: np.asarray(block[k])[sel] for k in (TEXT, *FIXED_FEATURES) if k in block}
        lengths = np.asarray(block["n_tokens"])[sel].astype(np.int32) if "n_tokens" in block else None
        offsets = np.asarray(block["offsets"])[sel] if "offsets" in block else None
        conv = None
        if "messages" in block:
            texts = [str(block["messages"][i]) for i in sel]
            conv = [json.loads(t) if t else None for t in texts] if any(texts) else None
        out = cls(
            workload, tuple(modalities), [str(ids[i]) for i in sel], sel.astype(np.int64), feats,
            np.asarray(block["presence"], dtype=np.float32)[sel],
            np.asarray(block["preprocess_ms"], dtype=np.float32)[sel], lengths, offsets,
            Rejected(bad.astype(np.int64), [str(ids[i]) for i in bad], [str(codes[i]) for i in bad],
                     [str(block["error_message"][i]) for i in bad]),
            size=n, pad_id=pad_id, fixed_length=fixed_length, messages=conv,
        )
        out._trim()
        return out


class BatchBuilder:
    """Collates decoded rows straight into preallocated columns (no list of
    per-record objects kept).  ``add`` one :class:`Prepared` at a time,
    ``reject`` the records that failed, then ``build``."""

    def __init__(
        self, workload: str, modalities: Sequence[str], shapes: dict[str, tuple[int, ...]], *, text: bool,
        pad_id: int = 0, fixed_length: int | None = None, capacity: int = 64, max_length: int | None = None,
    ) -> None:
        self.workload = workload
        self.modalities = tuple(modalities)
        self.shapes = shapes
        self.text = text
        self.pad_id = pad_id
        self.fixed_length = fixed_length
        self.cap = max(1, capacity)
        self.seq_cap = max(1, max_length or fixed_length or 8)
        self.n = 0
        self.ids: list[str] = []
        self.positions: list[int] = []
        self.rejected = Rejected()
        self.size = 0
        self.messages: list[list[dict[str, str]] | None] = []
        self._alloc()

    def _alloc(self) -> None:
        cap, m = self.cap, len(self.modalities)
        self.feats = {k: np.zeros((cap, *s), dtype=np.float32) for k, s in self.shapes.items()}
        self.presence = np.zeros((cap, m), dtype=np.float32)
        self.pre_ms = np.zeros(cap, dtype=np.float32)
        if self.text:
            self.tok = np.full((cap, self.seq_cap), self.pad_id, dtype=np.int64)
            self.offs = np.zeros((cap, self.seq_cap, 2), dtype=np.int32)
            self.lengths = np.zeros(cap, dtype=np.int32)

    def _grow(self, rows: int, seq: int) -> None:
        if rows > self.cap:
            cap = max(rows, self.cap * 2)
            self.feats = {k: _resize_rows(v, cap) for k, v in self.feats.items()}
            self.presence = _resize_rows(self.presence, cap)
            self.pre_ms = _resize_rows(self.pre_ms, cap)
            if self.text:
                self.tok = _resize_rows(self.tok, cap, self.pad_id)
                self.offs = _resize_rows(self.offs, cap)
                self.lengths = _resize_rows(self.lengths, cap)
            self.cap = cap
        if self.text and seq > self.seq_cap:
            self.tok = pad_to(self.tok, 1, seq, self.pad_id)
            self.offs = pad_to(self.offs, 1, seq, 0)
            self.seq_cap = seq

    def add(self, p: Prepared, position: int) -> None:
        ids = p.features.get(TEXT) if self.text else None
        self._grow(self.n + 1, len(ids) if ids is not None else 0)
        i = self.n
        for k in self.feats:
            v = p.features.get(k)
            if v is not None:
                self.feats[k][i] = v
        self.presence[i] = [1.0 if p.present.get(m) else 0.0 for m in self.modalities]
        self.pre_ms[i] = p.preprocess_ms
        if ids is not None:
            t = len(ids)
            self.tok[i, :t] = ids
            self.lengths[i] = t
            if p.offsets:
                self.offs[i, : len(p.offsets)] = p.offsets
        self.ids.append(p.id)
        self.positions.append(position)
        self.messages.append(p.messages)
        self.n += 1
        self.size = max(self.size, position + 1)

    def reject(self, position: int, rid: str | None, code: str, message: str) -> None:
        self.rejected.add(position, rid, code, message)
        self.size = max(self.size, position + 1)

    def build(self) -> ColumnarBatch:
        n = self.n
        feats = {k: v[:n] for k, v in self.feats.items()}
        lengths = offsets = None
        if self.text:
            longest = max(int(self.lengths[:n].max()) if n else 1, 1)
            feats[TEXT] = self.tok[:n, :longest]
            offsets = self.offs[:n, :longest]
            lengths = self.lengths[:n]
        return ColumnarBatch(
            self.workload, self.modalities, self.ids, np.asarray(self.positions, dtype=np.int64), feats,
            self.presence[:n], self.pre_ms[:n], lengths, offsets, self.rejected, self.size,
            self.pad_id, self.fixed_length, self.messages if any(m is not None for m in self.messages) else None,
        )


def _resize_rows(arr: np.ndarray, rows: int, fill: int | float = 0) -> np.ndarray:
    out = np.full((rows, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out
