"""Activations, thresholds, top-k and BIO span merging."""

from __future__ import annotations

import numpy as np

from pipeline.postprocess import head_result, sigmoid, softmax
from pipeline.spec import HeadSpec


def test_stable_activations() -> None:
    x = np.array([-1000.0, 0.0, 1000.0])
    assert np.allclose(sigmoid(x), [0, 0.5, 1])
    assert np.isclose(softmax(x).sum(), 1.0)


def test_multiclass_top_k() -> None:
    h = HeadSpec(name="c", type="multiclass", labels=["a", "b", "c"], top_k=2)
    r = head_result(h, np.array([0.0, 3.0, 1.0]))
    assert [ls.label for ls in r.labels] == ["b", "c"]
    assert abs(sum(r.scores.values()) - 1) < 1e-9


def test_multilabel_per_label_thresholds() -> None:
    h = HeadSpec(name="m", type="multilabel", labels=["a", "b", "c"], threshold=0.5, thresholds={"c": 0.2})
    r = head_result(h, np.array([2.0, -2.0, -1.0]))  # 0.88, 0.12, 0.27
    assert [ls.label for ls in r.labels] == ["a", "c"]


def test_token_spans_merge_bio() -> None:
    h = HeadSpec(name="t", type="token", labels=["O", "B-A", "I-A", "B-F", "I-F"])
    tags = [0, 1, 2, 0, 3, 4, 4, 0]  # CLS, B-A, I-A, O, B-F, I-F, I-F(pad), SEP
    logits = np.eye(5)[tags] * 10
    offsets = [(0, 0), (0, 4), (5, 9), (10, 12), (13, 18), (18, 20), (0, 0), (0, 0)]
    spans = head_result(h, logits, offsets).spans
    assert [(s.start, s.end, s.label) for s in spans] == [(0, 9, "A"), (13, 20, "F")]


def test_orphan_inside_tag_starts_a_span() -> None:
    h = HeadSpec(name="t", type="token", labels=["O", "B-A", "I-A"])
    logits = np.eye(3)[[2, 2]] * 10
    spans = head_result(h, logits, [(0, 3), (4, 6)]).spans
    assert [(s.start, s.end) for s in spans] == [(0, 6)]


def _reference(head: HeadSpec, logits: np.ndarray) -> tuple[list[str], dict[str, float]]:
    """The per-record float64 postprocessing the batch code replaced."""
    x = logits.astype(np.float64)
    if head.type == "multiclass":
        e = np.exp(x - x.max())
        p = e / e.sum()
        order = np.argsort(-p, kind="stable")[: head.top_k]
        return [head.labels[i] for i in order], dict(zip(head.labels, p.tolist(), strict=True))
    p = 1.0 / (1.0 + np.exp(-x))
    chosen = sorted(((lab, v) for lab, v in zip(head.labels, p, strict=True) if v >= head.threshold_for(lab)),
                    key=lambda t: -t[1])
    return [lab for lab, _ in chosen], dict(zip(head.labels, p.tolist(), strict=True))


def test_batch_postprocessing_matches_the_per_record_float64_reference() -> None:
    from pipeline.postprocess import head_columns, head_dicts

    rng = np.random.default_rng(0)
    heads = [HeadSpec(name="c", type="multiclass", labels=list("abcdefg"), top_k=3),
             HeadSpec(name="m", type="multilabel", labels=list("abcdef"), threshold=0.5, thresholds={"b": 0.3})]
    for head in heads:
        logits = (rng.standard_normal((512, len(head.labels))) * 4).astype(np.float32)
        got = head_dicts(head_columns(head, logits))
        for row, d in zip(logits, got, strict=True):
            labels, scores = _reference(head, row)
            margin = np.abs(np.array(list(scores.values())) - head.threshold).min()
            if head.type == "multilabel" and margin < 1e-6:
                continue  # a score within float32 rounding of its threshold: either side is right
            assert [ls["label"] for ls in d["labels"]] == labels
            assert max(abs(d["scores"][k] - v) for k, v in scores.items()) < 1e-6
