"""The Predictor with the PyTorch engine: errors isolated, order kept,
metrics recorded, no record content in logs."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import EngineConfig, Limits
from pipeline.engines import create_engine
from pipeline.metrics import Metrics
from pipeline.package import load_package
from pipeline.predictor import Predictor
from pipeline.tooling import sample_data


def _predictor(pkg_dir: Path, **kw) -> tuple[Predictor, CollectorRegistry]:
    pkg = load_package(pkg_dir)
    reg = CollectorRegistry()
    pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="torch")), metrics=Metrics(reg), **kw)
    return pred, reg


@pytest.mark.parametrize("workload", ["medical", "retail", "media"])
def test_good_and_broken_records_in_one_batch(tiny_packages: dict[str, Path], workload: str) -> None:
    pred, reg = _predictor(tiny_packages[workload], batch_size=8)
    good = [s.record for s in sample_data.generate(workload, 12, seed=7)]
    broken = sample_data.broken_records(workload, seed=7)
    inputs = []
    for i, g in enumerate(good):
        inputs.append(g)
        if i < len(broken):
            inputs.append(broken[i][0])
    inputs.extend(b for b, _ in broken[len(good):])
    results = pred.predict(inputs)
    assert len(results) == len(inputs)
    expected_errors = [reason for _, reason in broken]
    got_errors = [r.error.code for r in results if r.error]
    assert sorted(got_errors) == sorted(expected_errors)
    ok = [r for r in results if r.error is None]
    assert [r.id for r in ok] == [g["id"] for g in good]
    for r in ok:
        assert set(r.heads) == {h.name for h in pred.spec.heads}
        assert r.model == pred.package.name and r.engine == "torch" and r.provider == "cpu"
        assert {"preprocess", "infer", "postprocess"} <= set(r.timings_ms)
    lab = {"path": "cli", "workload": workload, "model": pred.package.name}
    assert reg.get_sample_value("mmpipe_records_total", {**lab, "outcome": "ok"}) == len(good)
    assert reg.get_sample_value("mmpipe_records_total", {**lab, "outcome": "error"}) == len(broken)
    assert reg.get_sample_value("mmpipe_model_info", {**lab, "version": "1", "engine": "torch",
                                                       "provider": "cpu"}) == 1


def test_results_do_not_depend_on_batch_company(tiny_packages: dict[str, Path]) -> None:
    """The same record gives the same scores alone or in a padded batch."""
    pred, _ = _predictor(tiny_packages["medical"], batch_size=16)
    recs = [s.record for s in sample_data.generate("medical", 10, seed=11)]
    together = pred.predict(recs)
    alone = [pred.predict([r])[0] for r in recs]
    for a, b in zip(together, alone, strict=True):
        for name, head in a.heads.items():
            for lab, score in head.scores.items():
                assert abs(score - b.heads[name].scores[lab]) < 1e-4


def test_missing_modalities_answered(tiny_packages: dict[str, Path]) -> None:
    pred, _ = _predictor(tiny_packages["media"])
    full = sample_data.generate("media", 30, seed=5, missing_rate=0.0)
    rec = next(s.record for s in full if "audio" in s.record and "image" in s.record and "text" in s.record)
    variants = [{k: v for k, v in rec.items() if k not in drop} for drop in
                ({"image"}, {"audio"}, {"text"}, {"image", "audio"}, {"text", "audio"})]
    for r in pred.predict(variants):
        assert r.error is None and r.heads["moderation"].labels


def test_limits_from_config_apply(tiny_packages: dict[str, Path]) -> None:
    pred, _ = _predictor(tiny_packages["retail"], limits=Limits(max_image_pixels=100))
    rec = next(s.record for s in sample_data.generate("retail", 10, seed=2) if "image" in s.record)
    assert pred.predict([rec])[0].error.code == "image_too_many_pixels"


def test_workload_and_modality_mismatch(tiny_packages: dict[str, Path]) -> None:
    pred, _ = _predictor(tiny_packages["retail"])
    out = pred.predict([
        {"id": "a", "workload": "media", "text": "hello"},
        {"id": "b", "workload": "retail", "audio": base64.b64encode(b"RIFF").decode()},
    ])
    assert [r.error.code for r in out] == ["workload_mismatch", "modality_not_supported"]


def test_engine_failure_isolated_to_the_record(tiny_packages: dict[str, Path]) -> None:
    pred, _ = _predictor(tiny_packages["retail"], batch_size=4)
    real_run = pred.engine.run

    def flaky(feeds):  # an engine that fails whenever the poisoned row is in the batch
        if (feeds["tabular"] > 1e3).any():
            raise RuntimeError("engine exploded")
        return real_run(feeds)

    pred.engine.run = flaky  # type: ignore[method-assign]
    recs = [s.record for s in sample_data.generate("retail", 6, seed=1, missing_rate=0.0)]
    recs[2] = {**recs[2], "tabular": {"price": 1e9}}
    out = pred.predict(recs)
    assert [r.error.code if r.error else "ok" for r in out] == ["ok", "ok", "inference_failed", "ok", "ok", "ok"]


def test_no_record_content_in_logs(tiny_packages: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.log import JsonFormatter

    pred, _ = _predictor(tiny_packages["medical"])
    secret_text = "patient jane roe mrn 99812 chest radiograph shows nodule"
    recs = [
        {"id": "ACC-123456", "workload": "medical", "text": secret_text},
        {"id": "ACC-654321", "workload": "medical", "text": secret_text, "image": "!!notbase64"},
        {"id": "ACC-777777", "workload": "medical", "text": secret_text * 1000},
        json.dumps({"id": "ACC-888888", "workload": "medical", "text": secret_text})[:-3].encode(),
    ]
    with caplog.at_level(logging.DEBUG):
        pred.predict(recs)
    fmt = JsonFormatter()
    logged = "\n".join(fmt.format(r) for r in caplog.records)
    assert "record_rejected" in logged
    for needle in ("jane roe", "99812", "ACC-654321", "ACC-777777"):
        assert needle not in logged


def test_unreachable_engine_fails_the_chunk_without_per_record_retries(tiny_packages: dict[str, Path]) -> None:
    from pipeline.engines import EngineUnavailable

    pred, _ = _predictor(tiny_packages["retail"], batch_size=8)
    calls = []

    def down(feeds):
        calls.append(len(feeds["presence"]))
        raise EngineUnavailable("server down")

    pred.engine.run = down  # type: ignore[method-assign]
    recs = [s.record for s in sample_data.generate("retail", 8, seed=1)]
    out = pred.predict(recs)
    assert [r.error.code for r in out] == ["inference_failed"] * 8
    assert calls == [8], "an unreachable engine must not be retried record by record"
