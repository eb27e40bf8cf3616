"""Logits -> labels and scores: one implementation for every engine and path."""

from __future__ import annotations

import numpy as np

from pipeline.records import HeadResult, LabelScore, TokenSpan
from pipeline.spec import HeadSpec


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def head_result(
    head: HeadSpec, logits: np.ndarray, offsets: list[tuple[int, int]] | None = None
) -> HeadResult:
    """Result of one head for one record.

    ``logits``: ``[labels]`` for classification heads, ``[seq, tags]`` for a
    token head (``offsets`` gives each token's character span; special and
    pad tokens carry (0, 0) and are skipped)."""
    if head.type == "multiclass":
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")[: head.top_k]
        return HeadResult(
            type="multiclass",
            labels=[LabelScore(label=head.labels[i], score=float(probs[i])) for i in order],
            scores={lab: float(p) for lab, p in zip(head.labels, probs, strict=True)},
        )
    if head.type == "multilabel":
        probs = sigmoid(logits)
        chosen = [
            LabelScore(label=lab, score=float(p))
            for lab, p in zip(head.labels, probs, strict=True)
            if p >= head.threshold_for(lab)
        ]
        chosen.sort(key=lambda ls: -ls.score)
        return HeadResult(
            type="multilabel",
            labels=chosen,
            scores={lab: float(p) for lab, p in zip(head.labels, probs, strict=True)},
        )
    return HeadResult(type="token", spans=token_spans(head, logits, offsets or []))


def token_spans(head: HeadSpec, logits: np.ndarray, offsets: list[tuple[int, int]]) -> list[TokenSpan]:
    """Merge BIO token tags into character spans.  An ``I-X`` tag continues a
    span of type X; a ``B-X`` (or an ``I-X`` after another type) starts one.
    The span score is the lowest token probability in it (a conservative
    confidence)."""
    probs = softmax(logits[: len(offsets)])
    tags = probs.argmax(-1)
    spans: list[TokenSpan] = []
    cur: dict | None = None
    for i, (start, end) in enumerate(offsets):
        if start == end:  # special or pad token
            continue
        tag = head.labels[int(tags[i])]
        score = float(probs[i, tags[i]])
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if kind is None:
            if cur:
                spans.append(TokenSpan(**cur))
            cur = None
            continue
        if cur is not None and tag.startswith("I-") and cur["label"] == kind:
            cur["end"] = end
            cur["score"] = min(cur["score"], score)
        else:
            if cur:
                spans.append(TokenSpan(**cur))
            cur = {"start": start, "end": end, "label": kind, "score": score}
    if cur:
        spans.append(TokenSpan(**cur))
    return spans
