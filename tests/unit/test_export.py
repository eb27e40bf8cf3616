"""ONNX export with parity for every fusion strategy x head; refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from exporters.onnx_export import ExportError, export_package
from exporters.package import build_package
from pipeline.config import EngineConfig
from pipeline.engines import create_engine
from pipeline.errors import PackageError
from pipeline.package import load_package, write_manifest
from pipeline.predictor import Predictor
from pipeline.spec import HeadSpec, load_workload
from pipeline.tooling import sample_data
from pipeline.tooling.train import train


def _all_heads_package(root: Path, fusion: str) -> Path:
    """Medical data (text + image + audio) with all three head types."""
    spec = load_workload("medical")
    primary = HeadSpec(name="primary", type="multiclass",
                       labels=["none", "nodule", "effusion", "fracture", "cardiomegaly"])
    spec = spec.model_copy(update={"heads": [*spec.heads, primary]})
    samples = [
        dataclasses.replace(s, labels={**s.labels, "primary": (s.labels["findings"] or ["none"])[0]})
        for s in sample_data.generate("medical", 96, seed=4)
    ]
    train(spec, samples, root / "trained", fusion=fusion, max_steps=40, progress=False)
    return build_package(root / "trained", root / "pkg").root


@pytest.mark.parametrize("fusion", ["concat", "gated", "cross_attention"])
def test_export_parity_every_fusion_and_head(tmp_path: Path, fusion: str) -> None:
    pkg_dir = _all_heads_package(tmp_path, fusion)
    samples = [s.record for s in sample_data.generate("medical", 48, seed=9, missing_rate=0.3)]
    pkg, report = export_package(pkg_dir, ("fp32", "fp16", "int8"), sample_records=samples)
    assert {"onnx-fp32", "onnx-fp16", "onnx-int8"} <= set(pkg.manifest.variants)
    for name in ("fp32", "fp16", "int8"):
        v = report["variants"][name]
        assert v["passed"], v["failures"]
        assert set(v["max"]) == {"findings", "report_tags", "primary"}
    assert report["variants"]["fp32"]["sample_agreement"] == 1.0
    _heads_and_fusion_stay_fp32(pkg.path("onnx/model.int8.onnx"), report["variants"]["int8"]["quantization"])
    assert pkg.manifest.parity == json.loads(json.dumps(report))
    # Every file of every variant is checksummed.
    for v in pkg.manifest.variants.values():
        assert set(v.files) <= set(pkg.manifest.files)
    # The ONNX Runtime engine gives the Predictor the same answers as torch.
    recs = samples[:16]
    torch_pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="torch")))
    ort_pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")))
    assert ort_pred.engine.provider == "CPUExecutionProvider"
    for a, b in zip(torch_pred.predict(recs), ort_pred.predict(recs), strict=True):
        assert b.engine == "onnxruntime" and b.provider == "CPUExecutionProvider"
        for head in a.heads:
            assert [x.label for x in a.heads[head].labels] == [x.label for x in b.heads[head].labels]
            for lab, s in a.heads[head].scores.items():
                assert abs(s - b.heads[head].scores[lab]) < 1e-4
            if a.heads[head].spans is not None:
                assert [(s.start, s.end, s.label) for s in a.heads[head].spans] == [
                    (s.start, s.end, s.label) for s in b.heads[head].spans]


def _heads_and_fusion_stay_fp32(int8: Path, q: dict) -> None:
    """As the README says: the towers' dense layers are int8, the fusion
    layer and the heads fp32, in the file itself (the quantizer renames a
    Gemm it rewrites to <gemm>_MatMul; those must stay fp32 too)."""
    import onnx

    nodes = onnx.load(str(int8)).graph.node
    integer = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    assert integer and len(integer) == q["quantized"] and q["size_ratio"] < 1.0
    assert all(n.startswith(("/text/", "/image/", "/audio/", "/tabular/")) for n in integer), integer
    assert all(any(k.startswith(f"/{h}/") for k in q["kept_fp32"]) for h in ("findings", "report_tags", "primary"))
    assert q["kept_why"] == "fusion layer and heads"
    fp32_dense = {n.name for n in nodes if n.op_type in ("MatMul", "Gemm")}
    assert all(k in fp32_dense or f"{k}_MatMul" in fp32_dense for k in q["kept_fp32"])


@pytest.fixture(scope="module")
def exported(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("exp") / "retail"
    shutil.copytree(tiny_packages["retail"], dst)
    # fp32 only: a model trained for three steps has near-tied scores, so
    # int8's label agreement on it says nothing (int8 is covered above, on
    # models trained long enough to have decisions).
    export_package(dst, ("fp32",))
    return dst


def test_static_int8_variant(tmp_path: Path) -> None:
    pkg_dir = _all_heads_package(tmp_path, "gated")
    pkg, report = export_package(pkg_dir, ("fp32", "int8"), static_int8=True)
    assert pkg.manifest.variants["onnx-int8"].quantization == "static-qdq"
    assert report["variants"]["int8"]["passed"], report["variants"]["int8"]["failures"]


def test_tampered_onnx_refused(exported: Path, tmp_path: Path) -> None:
    dst = tmp_path / "p"
    shutil.copytree(exported, dst)
    f = dst / "onnx" / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"checksum mismatch for onnx/model\.onnx"):
        load_package(dst)


def test_mismatched_onnx_refused(exported: Path, tiny_packages: dict[str, Path], tmp_path: Path) -> None:
    """A graph from another model, checksummed as if it belonged: the engine
    compares it with the signature and says which input differs."""
    other = tmp_path / "media"
    shutil.copytree(tiny_packages["media"], other)
    export_package(other, ("fp32",))
    dst = tmp_path / "p"
    shutil.copytree(exported, dst)
    shutil.copyfile(other / "onnx" / "model.onnx", dst / "onnx" / "model.onnx")
    from pipeline.package import read_manifest

    write_manifest(dst, read_manifest(dst))  # re-sign, so only the signature check can catch it
    pkg = load_package(dst)
    with pytest.raises(PackageError, match=r"does not match the package signature: .*input 'tabular' is missing"):
        create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu"))


def test_parity_failure_is_an_error_and_leaves_package_unchanged(tiny_packages: dict[str, Path],
                                                               tmp_path: Path, monkeypatch) -> None:
    from exporters import onnx_export

    dst = tmp_path / "p"
    shutil.copytree(tiny_packages["retail"], dst)
    before = (dst / "manifest.json").read_text()
    real = onnx_export.optimize_offline

    def broken_optimize(src: Path, out: Path) -> None:  # an exporter bug: weights perturbed
        import onnx
        from onnx import numpy_helper

        real(src, out)
        m = onnx.load(str(out))
        init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        arr = numpy_helper.to_array(init).copy()
        init.CopyFrom(numpy_helper.from_array(arr * 1.5, init.name))
        onnx.save(m, str(out))

    monkeypatch.setattr(onnx_export, "optimize_offline", broken_optimize)
    with pytest.raises(ExportError, match="parity check failed for fp32"):
        export_package(dst, ("fp32",))
    assert (dst / "manifest.json").read_text() == before
    assert not (dst / "onnx").exists()


def test_onnx_engine_reports_provider_and_falls_back(exported: Path, caplog) -> None:
    import logging

    pkg = load_package(exported)
    with caplog.at_level(logging.INFO):
        eng = create_engine(pkg, EngineConfig(kind="onnxruntime", device="auto", variant="fp32"))
    assert eng.provider == "CPUExecutionProvider"
    events = [r.getMessage() for r in caplog.records]
    assert "provider_unavailable_falling_back" in events
    unavailable = {getattr(r, "provider", None) for r in caplog.records
                   if r.getMessage() == "provider_unavailable_falling_back"}
    assert {"TensorrtExecutionProvider", "CUDAExecutionProvider"} <= unavailable


def test_tensorrt_path_without_gpu(exported: Path) -> None:
    from exporters.tensorrt import TensorRTUnavailable, build_tensorrt, tensorrt_available

    ok, _why = tensorrt_available()
    if ok:
        pytest.skip("a TensorRT provider is present: covered by bench/gpu_checks.py")
    with pytest.raises(TensorRTUnavailable, match="TensorRT needs onnxruntime-gpu"):
        build_tensorrt(exported)
