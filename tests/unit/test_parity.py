"""Parity verdicts that do not flip: a different decision counts as a
disagreement only where the reference is clear of the variant's tolerance;
near-ties are counted apart.  And the batch comparison's bookkeeping."""

from __future__ import annotations

import numpy as np

from exporters import parity
from exporters.parity import TOLERANCES, Decisions, head_decisions
from pipeline.spec import HeadSpec, WorkloadSpec

CLASSES = HeadSpec(name="category", type="multiclass", labels=["a", "b", "c"])
TAGS = HeadSpec(name="tags", type="multilabel", labels=["x", "y"], threshold=0.5)
TOKENS = HeadSpec(name="ner", type="token", labels=["O", "B", "I"])


def test_multiclass_near_tie_is_not_a_disagreement() -> None:
    """fp32 with |dlogit| 5e-6 on a reference tied to 1e-5: a near-tie, not a
    failure; the same flip on a clear reference (margin 0.5) is one."""
    ref = np.array([[1.0, 1.0 - 1e-5, 0.0], [1.0, 0.5, 0.0], [0.0, 2.0, 0.0]])
    got = np.array([[1.0 - 5e-6, 1.0 - 5e-6 + 1e-6, 0.0], [0.4, 0.5, 0.0], [0.0, 2.0, 0.0]])
    d = head_decisions(CLASSES, ref, got, None, TOLERANCES["fp32"])
    assert (d.total, d.agree, d.near_ties, d.disagree) == (3, 1, 1, 1)
    exact = head_decisions(CLASSES, ref, got, None, None)
    assert (exact.agree, exact.near_ties, exact.disagree) == (1, 0, 2)  # what used to flip verdicts


def test_int8_margins_are_probabilities() -> None:
    """int8's logits are not judged: the margin is in probability against
    its probability tolerance (0.15)."""
    ref = np.array([[0.2, 0.0, -5.0], [3.0, 0.0, -5.0]])  # probs margin ~0.05 and ~0.9
    got = np.array([[0.0, 0.2, -5.0], [0.0, 3.0, -5.0]])
    d = head_decisions(CLASSES, ref, got, None, TOLERANCES["int8"])
    assert (d.agree, d.near_ties, d.disagree) == (0, 1, 1)


def test_multilabel_near_threshold() -> None:
    """A label whose reference probability is within tolerance of its
    threshold may land either side; one clear of it may not."""
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    ref = np.array([[logit(0.50001), 5.0], [logit(0.9), -5.0], [logit(0.50001), logit(0.9)]])
    got = np.array([[logit(0.49999), 5.0], [logit(0.1), -5.0], [logit(0.49999), logit(0.1)]])
    d = head_decisions(TAGS, ref, got, None, TOLERANCES["fp16"])
    assert (d.total, d.agree, d.near_ties, d.disagree) == (3, 0, 1, 2)


def test_token_decisions_masked_or_all_positions() -> None:
    ref = np.zeros((1, 3, 3))
    ref[0, :, 0] = [2.0, 1.0 + 1e-5, 2.0]
    ref[0, :, 1] = [0.0, 1.0, 0.0]
    got = ref.copy()
    got[0, 1, 1] += 1e-4  # flips the near-tied token
    got[0, 2, 1] += 3.0  # flips a clear one, but it is padding
    mask = np.array([[1, 1, 0]])
    d = head_decisions(TOKENS, ref, got, mask, TOLERANCES["fp16"])
    assert (d.total, d.agree, d.near_ties, d.disagree) == (2, 1, 1, 0)
    d = head_decisions(TOKENS, ref, got, None, TOLERANCES["fp16"])  # no mask input: every position
    assert (d.total, d.disagree) == (3, 1)


def test_agreement_and_adding() -> None:
    d = Decisions()
    d.add(Decisions(total=100, agree=97, near_ties=2))
    d.add(Decisions(total=100, agree=100))
    assert d.disagree == 1 and abs(d.agreement - 0.995) < 1e-12
    assert Decisions().agreement == 1.0


def test_compare_keeps_its_exact_contract() -> None:
    """``compare`` (benchmarks) stays exact: (diffs, agreeing, total)."""
    spec = WorkloadSpec(name="w", heads=[CLASSES], preprocessing={"image": {}})
    ref = {"category": np.array([[1.0, 1.0 - 1e-5, 0.0]])}
    got = {"category": np.array([[1.0, 1.0 + 1e-5, 0.0]])}
    diffs, agree, total = parity.compare(spec, ref, got, None)
    assert (agree, total) == (0, 1) and abs(diffs["category"]["logit_abs"] - 2e-5) < 1e-12


def test_batch_diffs_pairs_each_record_with_itself() -> None:
    spec = WorkloadSpec(name="w", heads=[CLASSES, TOKENS], preprocessing={"text": {"max_length": 8}})
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 3))
    tokens = rng.normal(size=(5, 4, 3))
    single = [{"category": scores[i : i + 1], "ner": tokens[i : i + 1, : 2 + i % 2]} for i in range(5)]
    batched = [{"category": scores[:3], "ner": tokens[:3]}, {"category": scores[3:] + 0.01, "ner": tokens[3:]}]
    out = parity.batch_diffs(spec, single, batched)
    assert abs(out["category"]["logit_abs"] - 0.01) < 1e-9 and out["ner"]["logit_abs"] == 0.0
