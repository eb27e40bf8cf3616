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


def compare(spec: WorkloadSpec, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
            mask: np.ndarray | None) -> tuple[dict[str, dict[str, float]], int, int]:
    """Differences per output, and (agreeing, total) label decisions."""
    diffs: dict[str, dict[str, float]] = {}
    agree = total = 0
    for h in spec.heads:
        r, g = ref[h.name].astype(np.float64), got[h.name].astype(np.float64)
        if h.type == "token" and mask is not None:
            sel = mask.astype(bool)
            r_cmp, g_cmp = r[sel], g[sel]
        else:
            r_cmp, g_cmp = r, g
        if r_cmp.size == 0:
            continue
        abs_d = np.abs(r_cmp - g_cmp)
        diffs[h.name] = {
            "logit_abs": float(abs_d.max()),
            "logit_rel": float((abs_d / (np.abs(r_cmp) + 1e-3)).max()),
            "prob_abs": float(np.abs(probs(h, r_cmp) - probs(h, g_cmp)).max()),
        }
        pr, pg = predicted(h, r, mask), predicted(h, g, mask)
        if h.type == "token":  # every token's tag is one label decision
            agree += sum(int(np.sum(np.asarray(a) == np.asarray(b))) for a, b in zip(pr, pg, strict=True))
            total += sum(len(a) for a in pr)
        else:
            agree += sum(a == b for a, b in zip(pr, pg, strict=True))
            total += len(pr)
    return diffs, agree, total


def merge_max(into: dict[str, dict[str, float]], new: dict[str, dict[str, float]]) -> None:
    for out, d in new.items():
        cur = into.setdefault(out, {k: 0.0 for k in d})
        for k, v in d.items():
            cur[k] = max(cur[k], v)


def format_report(report: dict[str, Any]) -> str:
    """The parity report as a table (printed by ``mmpipe export``)."""
    lines = [f"{'variant':<8} {'output':<14} {'max |dlogit|':>13} {'max rel':>10} {'max |dprob|':>12} "
             f"{'agreement':>10}  result"]
    for vname, v in report["variants"].items():
        first = True
        for out, d in v["max"].items():
            agree = f"{v['sample_agreement'] * 100:.2f}%" if first else ""
            verdict = ("PASS" if v["passed"] else "FAIL") if first else ""
            lines.append(f"{vname if first else '':<8} {out:<14} {d['logit_abs']:>13.2e} {d['logit_rel']:>10.2e} "
                         f"{d['prob_abs']:>12.2e} {agree:>10}  {verdict}")
            first = False
        lines.append(f"{'':<8} ({v['cases']} cases, {v['sample_records']} sample records, provider "
                     f"{v['provider']}; tolerance |dlogit|<={v['tolerance']['logit_abs']}, "
                     f"|dprob|<={v['tolerance']['prob_abs']}, agreement>={v['tolerance']['agreement']:.0%})")
        for f in v.get("failures", []):
            lines.append(f"{'':<8} failure: {f}")
    return "\n".join(lines)
