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
