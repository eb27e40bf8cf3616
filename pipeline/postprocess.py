"""Logits -> labels and scores, over a whole batch at once.

One implementation for every engine and path: activations, thresholds and
top-k run as numpy operations on ``[rows, labels]`` arrays in float32 (the
engines' own precision); only token heads walk their tokens, because BIO
spans are a sequence per record.  :func:`head_result` (one record) is the
same code on a one-row batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.records import HeadResult, LabelScore, TokenSpan
from pipeline.spec import HeadSpec


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic, in the input's float precision (float32 at least)."""
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@dataclass
class HeadColumns:
    """One head's answer for every row of a batch.

    Classification heads: ``probs`` ``[rows, labels]`` and ``picked``: per
    row, the label indices to report, best first (top-k of a multiclass
    head; every label over its threshold of a multilabel head).  Token
    heads: ``spans`` per row."""

    spec: HeadSpec
    probs: np.ndarray | None = None
    picked: list[list[int]] | None = None
    spans: list[list[tuple[int, int, str, float]]] | None = None

    def take(self, idx: np.ndarray) -> HeadColumns:
        return HeadColumns(
            self.spec,
            self.probs[idx] if self.probs is not None else None,
            [self.picked[i] for i in idx] if self.picked is not None else None,
            [self.spans[i] for i in idx] if self.spans is not None else None,
        )

    @staticmethod
    def concat(parts: list[HeadColumns]) -> HeadColumns:
        first = parts[0]
        return HeadColumns(
            first.spec,
            np.concatenate([p.probs for p in parts if p.probs is not None]) if first.probs is not None else None,
            [r for p in parts for r in p.picked or []] if first.picked is not None else None,
            [r for p in parts for r in p.spans or []] if first.spans is not None else None,
        )


def head_columns(
    head: HeadSpec, logits: np.ndarray, offsets: np.ndarray | None = None, lengths: np.ndarray | None = None,
) -> HeadColumns:
    """One head over a batch.  ``logits``: ``[rows, labels]``, or
    ``[rows, seq, tags]`` for a token head, whose ``offsets`` (``[rows, seq,
    2]``) give each token's character span ((0, 0): special or pad) and
    ``lengths`` the tokens per row."""
    if head.type == "multiclass":
        probs = softmax(logits)
        k = min(head.top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return HeadColumns(head, probs, order.tolist())
    if head.type == "multilabel":
        probs = sigmoid(logits)
        thresholds = np.array([head.threshold_for(lab) for lab in head.labels], dtype=probs.dtype)
        over = probs >= thresholds[None, :]
        order = np.argsort(-probs, axis=1, kind="stable")
        picked = [[int(j) for j in row if hit[j]] for row, hit in zip(order, over, strict=True)] if len(probs) else []
        return HeadColumns(head, probs, picked)
    return HeadColumns(head, spans=token_span_rows(head, logits, offsets, lengths))


def token_span_rows(
    head: HeadSpec, logits: np.ndarray, offsets: np.ndarray | None, lengths: np.ndarray | None,
) -> list[list[tuple[int, int, str, float]]]:
    """Merge BIO token tags into character spans, per row.  An ``I-X`` tag
    continues a span of type X; a ``B-X`` (or an ``I-X`` after another type)
    starts one.  The span score is the lowest token probability in it (a
    conservative confidence).  Activations and argmax run over the batch."""
    rows = logits.shape[0]
    if offsets is None or rows == 0:
        return [[] for _ in range(rows)]
    seq = min(logits.shape[1], offsets.shape[1])
    probs = softmax(logits[:, :seq])
    tags = probs.argmax(-1)
    best = np.take_along_axis(probs, tags[..., None], -1)[..., 0]
    offs = offsets[:, :seq]
    real = offs[..., 0] != offs[..., 1]
    if lengths is not None:
        real &= np.arange(seq)[None, :] < np.asarray(lengths)[:, None]
    kinds = [lab[2:] if lab[:2] in ("B-", "I-") else None for lab in head.labels]
    inside = [lab.startswith("I-") for lab in head.labels]
    out: list[list[tuple[int, int, str, float]]] = []
    for r in range(rows):
        spans: list[tuple[int, int, str, float]] = []
        cur: list | None = None
        for i in np.flatnonzero(real[r]).tolist():
            tag = int(tags[r, i])
            kind = kinds[tag]
            start, end = int(offs[r, i, 0]), int(offs[r, i, 1])
            score = float(best[r, i])
            if kind is None:
                if cur:
                    spans.append(tuple(cur))  # type: ignore[arg-type]
                cur = None
            elif cur is not None and inside[tag] and cur[2] == kind:
                cur[1] = end
                cur[3] = min(cur[3], score)
            else:
                if cur:
                    spans.append(tuple(cur))  # type: ignore[arg-type]
                cur = [start, end, kind, score]
        if cur:
            spans.append(tuple(cur))  # type: ignore[arg-type]
        out.append(spans)
    return out


def head_result(
    head: HeadSpec, logits: np.ndarray, offsets: list[tuple[int, int]] | None = None
) -> HeadResult:
    """Result of one head for one record (the batch code on one row).

    ``logits``: ``[labels]`` for classification heads, ``[seq, tags]`` for a
    token head (``offsets`` gives each token's character span; special and
    pad tokens carry (0, 0) and are skipped)."""
    offs = None
    if head.type == "token":
        offs = np.zeros((1, len(offsets or []), 2), dtype=np.int64)
        if offsets:
            offs[0] = np.asarray(offsets, dtype=np.int64)
    cols = head_columns(head, np.asarray(logits)[None], offs)
    return head_results(cols)[0]


def head_results(cols: HeadColumns) -> list[HeadResult]:
    """A head's columns as pydantic objects (the typed API; paths use the
    wire form of :mod:`pipeline.results` instead)."""
    out = []
    for d in head_dicts(cols):
        if cols.spec.type == "token":
            out.append(HeadResult(type="token", spans=[TokenSpan(**s) for s in d["spans"]]))
        else:
            out.append(HeadResult(type=d["type"], labels=[LabelScore(**ls) for ls in d["labels"]],
                                  scores=d["scores"]))
    return out


def head_dicts(cols: HeadColumns) -> list[dict]:
    """A head's answer per row as plain dicts, in the result's JSON shape."""
    head = cols.spec
    if head.type == "token":
        assert cols.spans is not None
        return [{"type": "token", "labels": [], "scores": {},
                 "spans": [{"start": s, "end": e, "label": lab, "score": sc} for s, e, lab, sc in row]}
                for row in cols.spans]
    assert cols.probs is not None and cols.picked is not None
    labels = head.labels
    out = []
    for probs, picked in zip(cols.probs.tolist(), cols.picked, strict=True):
        out.append({
            "type": head.type,
            "labels": [{"label": labels[j], "score": probs[j]} for j in picked],
            "scores": dict(zip(labels, probs, strict=True)),
        })
    return out
