"""Proof that an exported variant computes the same function as the PyTorch
model.

Two kinds of input are compared, at several batch sizes and sequence lengths:

* random tensors drawn from the signature (any vocabulary id, any presence
  pattern), which probe the whole input space;
* real sample records, decoded by the same Preprocessor, with and without
  missing modalities, on which label agreement is measured.

Per output: max absolute and relative logit difference and max probability
difference; per variant: label agreement on the sample records.  Tolerances
differ by variant; an export that misses them is an error.

A label decision that differs only where the reference itself is within the
variant's tolerance of its boundary (two classes' logits closer than the
tolerance, a probability that close to its threshold) is a *near-tie*, not a
disagreement: rounding inside the tolerance may settle it either way, so
counting it would make the same export pass or fail from run to run.
Near-ties are counted and reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.postprocess import sigmoid, softmax
from pipeline.spec import HeadSpec, WorkloadSpec


@dataclass(frozen=True)
class Tolerance:
    logit_abs: float | None  # None: not judged (int8 logits shift; probabilities are)
    prob_abs: float
    agreement: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(logit_abs=1e-3, prob_abs=1e-4, agreement=1.0),
    "fp16": Tolerance(logit_abs=0.1, prob_abs=0.02, agreement=0.99),
    "int8": Tolerance(logit_abs=None, prob_abs=0.15, agreement=0.99),
}


def probs(head: HeadSpec, logits: np.ndarray) -> np.ndarray:
    return softmax(logits) if head.type in ("multiclass", "token") else sigmoid(logits)


def predicted(head: HeadSpec, logits: np.ndarray, mask: np.ndarray | None) -> list[Any]:
    """Per record, the predicted labels as the Predictor would report them."""
    p = probs(head, logits)
    if head.type == "multiclass":
        return [int(i) for i in p.argmax(-1)]
    if head.type == "multilabel":
        thr = np.array([head.threshold_for(lab) for lab in head.labels])
        return [tuple(np.flatnonzero(row >= thr)) for row in p]
    tags = p.argmax(-1)
    assert mask is not None
    return [tuple(t[m.astype(bool)]) for t, m in zip(tags, mask, strict=True)]


@dataclass
class Decisions:
    """Label decisions compared: the same, near-ties (different, but within
    the tolerance of the reference's boundary) and the rest (disagreements)."""

    total: int = 0
    agree: int = 0
    near_ties: int = 0

    @property
    def disagree(self) -> int:
        return self.total - self.agree - self.near_ties

    @property
    def agreement(self) -> float:
        """Share of decisions that are not disagreements."""
        return 1.0 - self.disagree / self.total if self.total else 1.0

    def add(self, other: Decisions) -> None:
        self.total += other.total
        self.agree += other.agree
        self.near_ties += other.near_ties


def _tie_bound(tol: Tolerance | None) -> tuple[str, float]:
    """The space margins are measured in and the bound under which a
    different decision is a near-tie: logits when the variant's logits are
    judged, else probabilities (int8).  No tolerance: exact comparison."""
    if tol is None:
        return "logit", -1.0
    return ("logit", tol.logit_abs) if tol.logit_abs is not None else ("prob", tol.prob_abs)


def _argmax_decisions(head: HeadSpec, r: np.ndarray, g: np.ndarray, tol: Tolerance | None) -> Decisions:
    """Rows of [n, labels] scores, one argmax decision each (multiclass
    records, token tags)."""
    space, bound = _tie_bound(tol)
    a, b = r.argmax(-1), g.argmax(-1)
    ref = probs(head, r) if space == "prob" else r
    rows = np.arange(len(a))
    margin = ref[rows, a] - ref[rows, b]
    same = a == b
    ties = ~same & (margin <= bound)
    return Decisions(total=len(a), agree=int(same.sum()), near_ties=int(ties.sum()))


def _threshold_decisions(head: HeadSpec, r: np.ndarray, g: np.ndarray, tol: Tolerance | None) -> Decisions:
    """Multilabel records: a record agrees when every label's decision is
    the same; it is a near-tie when each label that differs is within the
    bound of its threshold in the reference."""
    space, bound = _tie_bound(tol)
    thr = np.array([head.threshold_for(lab) for lab in head.labels])
    pr, pg = probs(head, r), probs(head, g)
    differs = (pr >= thr) != (pg >= thr)
    if space == "prob":
        margin = np.abs(pr - thr)
    else:
        t = np.clip(thr, 1e-7, 1 - 1e-7)
        margin = np.abs(r.astype(np.float64) - np.log(t / (1 - t)))
    same = ~differs.any(-1)
    ties = ~same & np.all(~differs | (margin <= bound), axis=-1)
    return Decisions(total=len(same), agree=int(same.sum()), near_ties=int(ties.sum()))


def head_decisions(head: HeadSpec, r: np.ndarray, g: np.ndarray, mask: np.ndarray | None,
                   tol: Tolerance | None) -> Decisions:
    """One head's decisions, reference ``r`` against variant ``g``."""
    if head.type == "multilabel":
        return _threshold_decisions(head, r, g, tol)
    if head.type == "token":  # every token's tag is one decision
        if mask is None:  # a model without an attention mask: every position
            return _argmax_decisions(head, r.reshape(-1, r.shape[-1]), g.reshape(-1, g.shape[-1]), tol)
        sel = mask.astype(bool)
        return _argmax_decisions(head, r[sel], g[sel], tol)
    return _argmax_decisions(head, r, g, tol)


def random_feeds(signature: dict, batch: int, seq: int, vocab: int, modalities: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for spec in signature["inputs"]:
        name = spec["name"]
        feature = spec.get("feature") or name  # format 1 signatures: the name says it
        dtype = np.dtype(spec.get("dtype", "float32"))
        shape = [batch if d == "batch" else seq if d == "sequence" else int(d) for d in spec["shape"]]
        if feature in ("input_ids", "text.input_ids"):
            feeds[name] = rng.integers(5, max(6, vocab), size=shape).astype(dtype)
        elif feature in ("attention_mask", "text.attention_mask"):
            lengths = rng.integers(2, seq + 1, size=batch) if seq >= 2 else np.ones(batch, dtype=int)
            feeds[name] = (np.arange(seq)[None, :] < lengths[:, None]).astype(dtype)
        elif feature in ("token_type_ids", "text.token_type_ids"):
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif feature == "presence":
            pres = (rng.random((batch, modalities)) < 0.7).astype(np.float32)
            pres[np.arange(batch), rng.integers(0, modalities, size=batch)] = 1.0
            feeds[name] = pres.astype(dtype)
        else:
            feeds[name] = rng.normal(size=shape).astype(dtype)
    return feeds


def score_diffs(head: HeadSpec, r: np.ndarray, g: np.ndarray) -> dict[str, float]:
    """Max absolute and relative logit and max probability differences."""
    r, g = r.astype(np.float64), g.astype(np.float64)
    abs_d = np.abs(r - g)
    return {
        "logit_abs": float(abs_d.max()),
        "logit_rel": float((abs_d / (np.abs(r) + 1e-3)).max()),
        "prob_abs": float(np.abs(probs(head, r) - probs(head, g)).max()),
    }


def compare_decisions(spec: WorkloadSpec, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                      mask: np.ndarray | None, tol: Tolerance | None = None,
                      ) -> tuple[dict[str, dict[str, float]], Decisions]:
    """Differences per output, and the label decisions compared (near-ties
    judged against ``tol``; None: every different decision disagrees)."""
    diffs: dict[str, dict[str, float]] = {}
    decisions = Decisions()
    for h in spec.heads:
        r, g = ref[h.name], got[h.name]
        if h.type == "token" and mask is not None:
            sel = mask.astype(bool)
            r_cmp, g_cmp = r[sel], g[sel]
        else:
            r_cmp, g_cmp = r, g
        if r_cmp.size == 0:
            continue
        diffs[h.name] = score_diffs(h, r_cmp, g_cmp)
        decisions.add(head_decisions(h, r, g, mask, tol))
    return diffs, decisions


def compare(spec: WorkloadSpec, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
            mask: np.ndarray | None) -> tuple[dict[str, dict[str, float]], int, int]:
    """Differences per output, and (agreeing, total) label decisions, exact."""
    diffs, d = compare_decisions(spec, ref, got, mask)
    return diffs, d.agree, d.total


def batch_diffs(spec: WorkloadSpec, single: list[dict[str, np.ndarray]],
                batched: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """How far each record's scores move with its batch: ``single[i]`` is
    record i run alone, ``batched`` the same records in batches, in order.
    Token heads compare the positions of the record run alone."""
    out: dict[str, dict[str, float]] = {}
    rows = [(b, i) for b, chunk in enumerate(batched) for i in range(len(next(iter(chunk.values()))))]
    for h in spec.heads:
        worst: dict[str, dict[str, float]] = {}
        for one, (b, i) in zip(single, rows, strict=True):
            alone = one[h.name][0]
            together = batched[b][h.name][i][: alone.shape[0]] if h.type == "token" else batched[b][h.name][i]
            merge_max(worst, {h.name: score_diffs(h, alone, together)})
        out.update(worst)
    return out


def merge_max(into: dict[str, dict[str, float]], new: dict[str, dict[str, float]]) -> None:
    for out, d in new.items():
        cur = into.setdefault(out, {k: 0.0 for k in d})
        for k, v in d.items():
            cur[k] = max(cur[k], v)


def format_report(report: dict[str, Any]) -> str:
    """The parity report as a table (printed by ``mmpipe export`` and
    ``mmpipe package``), then per variant what it was judged on, and the
    package's warnings."""
    lines = [f"{'variant':<8} {'output':<14} {'max |dlogit|':>13} {'max rel':>10} {'max |dprob|':>12} "
             f"{'agreement':>10} {'near-ties':>9}  result"]
    for vname, v in report["variants"].items():
        first = True
        for out, d in v["max"].items():
            agree = f"{v['sample_agreement'] * 100:.2f}%" if first else ""
            ties = str(v.get("near_ties", 0)) if first else ""
            verdict = ("PASS" if v["passed"] else "FAIL") if first else ""
            lines.append(f"{vname if first else '':<8} {out:<14} {d['logit_abs']:>13.2e} {d['logit_rel']:>10.2e} "
                         f"{d['prob_abs']:>12.2e} {agree:>10} {ties:>9}  {verdict}")
            first = False
        lines.extend(f"{'':<8} {line}" for line in _variant_notes(v))
    lines.extend(_sample_notes(report.get("samples")))
    lines.extend(f"warning: {w}" for w in report.get("warnings", []))
    return "\n".join(lines)


def _variant_notes(v: dict[str, Any]) -> list[str]:
    tol = v["tolerance"]
    notes = [f"({v['cases']} cases, {v['sample_records']} sample records, provider {v['provider']}; tolerance "
             f"|dlogit|<={tol['logit_abs']}, |dprob|<={tol['prob_abs']}, agreement>={tol['agreement']:.0%}; "
             f"near-ties are decisions the reference itself makes within that tolerance)"]
    batch = v.get("batch")
    if batch:
        worst = max(d["logit_abs"] for d in batch["max"].values()) if batch["max"] else 0.0
        notes.append(f"batch {batch['sizes'][0]} vs {batch['sizes'][1]} on {batch['records']} records: "
                     f"max |dlogit| {worst:.2e} (a record's scores must not depend on its neighbours)")
    q = v.get("quantization")
    if q:
        notes.append(f"{q['quantized']} of {q['weight_nodes']} MatMul/Gemm nodes with weights quantized "
                     f"({len(q['kept_fp32'])} kept fp32: {q['kept_why']}); file {q['size_ratio']:.2f}x fp32")
    notes.extend(f"failure: {f}" for f in v.get("failures", []))
    return notes


def _sample_notes(samples: dict[str, Any] | None) -> list[str]:
    if not samples:
        return []
    line = f"sample records: {samples['used']} of {samples['given']} used"
    if samples.get("not_used"):
        line += "; not used: " + ", ".join(f"{n} {code}" for code, n in samples["not_used"].items())
    lines = [line]
    if samples.get("extra_ignored"):
        lines.append("sample records with a modality the model does not take (field ignored for parity): "
                     + ", ".join(f"{m} in {n}" for m, n in samples["extra_ignored"].items()))
    return lines
