"""Training the fusion model family on CPU.

Training uses the same Preprocessor as serving, so a model never meets a
feature at inference time that was computed differently in training.  Output
is a *trained model directory* (weights as safetensors, config, tokenizer,
workload spec, metrics) that ``mmpipe package`` turns into a model package.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import RecordError
from pipeline.log import log_event
from pipeline.preprocess import Prepared, Preprocessor
from pipeline.spec import HeadSpec, WorkloadSpec
from pipeline.tokenizer import TextEncoder, copy_pretrained, train_wordpiece

logger = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class Example:
    """A prepared record with its targets (one entry per head)."""

    prepared: Prepared
    targets: dict[str, Any]


@dataclass
class TrainReport:
    workload: str
    fusion: str
    train_records: int
    test_records: int
    epochs: int
    seconds: float
    f1: dict[str, float]
    f1_missing_modality: dict[str, float] = field(default_factory=dict)
    skipped_records: int = 0

    @property
    def macro_f1(self) -> float:
        return float(min(self.f1.values())) if self.f1 else 0.0


# -- targets --------------------------------------------------------------------
def token_targets(head: HeadSpec, offsets: list[tuple[int, int]], spans: list[tuple[int, int, str]]) -> np.ndarray:
    """BIO tag id per token from character spans.  Special tokens get IGNORE."""
    tags = np.full(len(offsets), IGNORE, dtype=np.int64)
    index = {lab: i for i, lab in enumerate(head.labels)}
    for t, (s, e) in enumerate(offsets):
        if s == e:
            continue
        tags[t] = index["O"]
        for ss, se, kind in spans:
            if s >= ss and e <= se:
                prefix = "B-" if s == ss else "I-"
                tags[t] = index.get(prefix + kind, index["O"])
                break
    return tags


def make_targets(spec: WorkloadSpec, labels: dict[str, Any], spans: list, prepared: Prepared) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for h in spec.heads:
        if h.type == "multiclass":
            out[h.name] = h.labels.index(labels[h.name])
        elif h.type == "multilabel":
            vec = np.zeros(len(h.labels), dtype=np.float32)
            for lab in labels.get(h.name, []):
                vec[h.labels.index(lab)] = 1.0
            out[h.name] = vec
        else:
            tags = token_targets(h, prepared.offsets, [tuple(s) for s in spans])
            if not prepared.present.get("text"):
                tags[:] = IGNORE
            out[h.name] = tags
    return out


# -- metrics ------------------------------------------------------------------------
def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    seen = (tp + fp + fn) > 0
    if not seen.any():
        return 1.0
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return float(f1[seen].mean())


def macro_f1(head: HeadSpec, truth: list[Any], pred: list[Any]) -> float:
    """Macro-F1 over labels (classification heads) or over non-O tags (token)."""
    n = len(head.labels)
    tp, fp, fn = np.zeros(n), np.zeros(n), np.zeros(n)
    for t, p in zip(truth, pred, strict=True):
        if head.type == "multiclass":
            tv, pv = np.eye(n)[t], np.eye(n)[p]
        elif head.type == "multilabel":
            tv, pv = np.asarray(t), np.asarray(p)
        else:
            keep = np.asarray(t) != IGNORE
            tv = np.eye(n)[np.asarray(t)[keep]].sum(0) if keep.any() else np.zeros(n)
            tt, pp = np.asarray(t)[keep], np.asarray(p)[keep]
            for k in range(1, n):  # skip O
                tp[k] += np.sum((tt == k) & (pp == k))
                fp[k] += np.sum((tt != k) & (pp == k))
                fn[k] += np.sum((tt == k) & (pp != k))
            continue
        tp += tv * pv
        fp += (1 - tv) * pv
        fn += tv * (1 - pv)
    if head.type == "token":
        return _f1(tp[1:], fp[1:], fn[1:])
    return _f1(tp, fp, fn)


def score_results(spec: WorkloadSpec, results: list, labels: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Macro-F1 per classification head of Predictor results (``Result``
    objects) against ground truth (record id -> {head: label or labels}).
    Error results and records without ground truth are not scored."""
    out: dict[str, float] = {}
    for h in spec.heads:
        if h.type == "token":
            continue
        truth: list[Any] = []
        pred: list[Any] = []
        for r in results:
            if r.error is not None or r.id not in labels:
                continue
            t = labels[r.id][h.name]
            got = [ls.label for ls in r.heads[h.name].labels]
            if h.type == "multiclass":
                truth.append(h.labels.index(t))
                pred.append(h.labels.index(got[0]))
            else:
                truth.append(np.isin(h.labels, t).astype(np.float32))
                pred.append(np.isin(h.labels, got).astype(np.float32))
        out[h.name] = round(macro_f1(h, truth, pred), 4)
    return out


# -- training ---------------------------------------------------------------------
def _drop(p: Prepared, modality: str, encoder: TextEncoder | None) -> Prepared:
    feats = dict(p.features)
    present = dict(p.present)
    present[modality] = False
    offsets = p.offsets
    if modality == "text":
        assert encoder is not None
        empty = encoder.empty()
        feats["input_ids"] = empty.ids
        offsets = [(0, 0)] * len(empty.ids)
    else:
        feats.pop({"image": "pixel_values", "audio": "audio_features", "tabular": "tabular"}[modality], None)
    return replace(p, features=feats, present=present, offsets=offsets)


def _drop_targets(ex: Example, spec: WorkloadSpec, n_tokens: int) -> dict[str, Any]:
    out = dict(ex.targets)
    for h in spec.heads:
        if h.type == "token":
            out[h.name] = np.full(n_tokens, IGNORE, dtype=np.int64)
    return out


def augment(ex: Example, spec: WorkloadSpec, encoder: TextEncoder | None, rng: random.Random, rate: float) -> Example:
    """Modality dropout: teaches the model to answer with modalities missing,
    exactly as the presence mask presents them at inference."""
    p = ex.prepared
    present = [m for m, v in p.present.items() if v]
    targets = ex.targets
    for m in list(present):
        if len(present) > 1 and rng.random() < rate:
            p = _drop(p, m, encoder)
            present.remove(m)
            if m == "text":
                targets = _drop_targets(ex, spec, len(p.features["input_ids"]))
    return Example(p, targets)


def _batch_targets(spec: WorkloadSpec, batch: list[Example], seq: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for h in spec.heads:
        vals = [ex.targets[h.name] for ex in batch]
        if h.type == "multiclass":
            out[h.name] = torch.tensor(vals, dtype=torch.long)
        elif h.type == "multilabel":
            out[h.name] = torch.from_numpy(np.stack(vals))
        else:
            arr = np.full((len(batch), seq), IGNORE, dtype=np.int64)
            for i, v in enumerate(vals):
                arr[i, : len(v)] = v
            out[h.name] = torch.from_numpy(arr)
    return out


def _loss(spec: WorkloadSpec, outputs: dict[str, Any], targets: dict[str, Any]):
    import torch.nn.functional as F

    total = 0.0
    for h in spec.heads:
        o, t = outputs[h.name], targets[h.name]
        if h.type == "multiclass":
            total = total + F.cross_entropy(o, t)
        elif h.type == "multilabel":
            total = total + F.binary_cross_entropy_with_logits(o, t)
        else:
            if (t != IGNORE).any():
                total = total + F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1), ignore_index=IGNORE)
    return total


def evaluate(
    model, spec: WorkloadSpec, pre: Preprocessor, examples: list[Example], batch_size: int = 64
) -> dict[str, float]:
    """Held-out macro-F1 per head, thresholds as the Predictor applies them."""
    import torch

    from pipeline.postprocess import sigmoid

    model.eval()
    truth: dict[str, list] = {h.name: [] for h in spec.heads}
    pred: dict[str, list] = {h.name: [] for h in spec.heads}
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            outs = model.run(pre.collate([e.prepared for e in chunk]))
            for h in spec.heads:
                o = outs[h.name].numpy()
                for j, ex in enumerate(chunk):
                    t = ex.targets[h.name]
                    if h.type == "multiclass":
                        pred[h.name].append(int(o[j].argmax()))
                    elif h.type == "multilabel":
                        thr = np.array([h.threshold_for(lab) for lab in h.labels])
                        pred[h.name].append((sigmoid(o[j]) >= thr).astype(np.float32))
                    else:
                        pred[h.name].append(o[j, : len(t)].argmax(-1))
                    truth[h.name].append(t)
    return {h.name: macro_f1(h, truth[h.name], pred[h.name]) for h in spec.heads}


def train(
    spec: WorkloadSpec,
    samples: list,  # list[sample_data.Sample]
    out_dir: Path,
    *,
    fusion: str | None = None,
    text_source: str = "builtin",
    epochs: int = 12,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    test_fraction: float = 0.2,
    modality_dropout: float = 0.2,
    model_overrides: dict[str, Any] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainReport:
    """Train a model on ``samples`` (records + labels) and save it to ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    from pipeline.tooling.model.config import FusionConfig
    from pipeline.tooling.model.fusion import FusionModel, resolve_text_source

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order = list(range(len(samples)))
    rng.shuffle(order)
    n_test = max(1, int(len(samples) * test_fraction))
    test_idx, train_idx = order[:n_test], order[n_test:]

    out_dir = Path(out_dir)
    tok_dir = out_dir / "tokenizer"
    encoder: TextEncoder | None = None
    if spec.preprocessing.text is not None:
        src = resolve_text_source(text_source)
        if src is None:
            corpus = [samples[i].record.get("text") or "" for i in train_idx]
            tok = train_wordpiece(corpus, vocab_size=2000, lowercase=spec.preprocessing.text.lowercase)
            encoder = TextEncoder(tok, spec.preprocessing.text.max_length)
            encoder.save(tok_dir)
        else:
            copy_pretrained(src, tok_dir)
            encoder = TextEncoder.load(tok_dir, spec.preprocessing.text.max_length)

    pre = Preprocessor(spec, encoder)
    examples: dict[int, Example] = {}
    skipped = 0
    for i, s in enumerate(samples):
        try:
            p = pre.prepare(s.record)
        except RecordError:
            skipped += 1
            continue
        examples[i] = Example(p, make_targets(spec, s.labels, s.spans, p))
    train_ex = [examples[i] for i in train_idx if i in examples]
    test_ex = [examples[i] for i in test_idx if i in examples]
    if not train_ex or not test_ex:
        raise ValueError("not enough valid records to train and evaluate")

    overrides: dict[str, Any] = dict(model_overrides or {})
    if fusion:
        overrides["fusion"] = fusion
    if encoder is not None:
        text_over = {"source": text_source, **overrides.pop("text", {})}
        if text_source == "builtin":
            text_over["vocab_size"] = encoder.vocab_size
        overrides["text"] = text_over
    cfg = FusionConfig.for_workload(spec, **overrides)
    model = FusionModel(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    steps_per_epoch = (len(train_ex) + batch_size - 1) // batch_size
    total_steps = max_steps or epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    step = 0
    epoch = 0
    while step < total_steps:
        model.train()
        epoch += 1
        rng.shuffle(train_ex)
        losses = []
        for b in range(0, len(train_ex), batch_size):
            if step >= total_steps:
                break
            batch = [augment(e, spec, encoder, rng, modality_dropout) for e in train_ex[b : b + batch_size]]
            feeds = pre.collate([e.prepared for e in batch])
            targets = _batch_targets(spec, batch, feeds["input_ids"].shape[1] if "input_ids" in feeds else 0)
            loss = _loss(spec, model.run(feeds), targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
        if progress:
            log_event(logger, logging.INFO, "train_epoch", epoch=epoch, loss=round(float(np.mean(losses)), 4),
                      workload=spec.name)

    f1 = evaluate(model, spec, pre, test_ex)
    # Robustness: the same held-out set with one modality removed from each record.
    drop_rng = random.Random(seed + 1)
    dropped = [augment(e, spec, encoder, drop_rng, 1.0 / max(1, len(spec.modalities))) for e in test_ex]
    f1_missing = evaluate(model, spec, pre, dropped)

    (out_dir / "model").mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model" / "model.safetensors"))
    (out_dir / "model" / "config.json").write_text(cfg.model_dump_json(indent=2))
    (out_dir / "workload.json").write_text(spec.model_dump_json(indent=2))
    report = TrainReport(
        workload=spec.name, fusion=cfg.fusion, train_records=len(train_ex), test_records=len(test_ex),
        epochs=epoch, seconds=round(time.perf_counter() - t_start, 1), f1=f1,
        f1_missing_modality=f1_missing, skipped_records=skipped,
    )
    (out_dir / "training.json").write_text(json.dumps(report.__dict__, indent=2))
    return report
