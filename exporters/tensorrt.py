"""TensorRT engines through ONNX Runtime's TensorRT provider.

The engine is built for the GPU it runs on, so it is built on the GPU node
(``mmpipe export --tensorrt`` there, or at first load with the engine cache
enabled), with optimization profiles covering the dynamic batch and sequence
axes.  Building warms the cache at the profile's min / opt / max shapes so
the first real request does not pay the build, then checks parity against
the PyTorch model like every other variant.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from exporters import parity
from exporters.onnx_export import ExportError, check_parity, sample_prepared
from pipeline.log import log_event
from pipeline.package import ModelPackage, Variant, load_package, write_manifest

logger = logging.getLogger(__name__)


class TensorRTUnavailable(ExportError):
    """No TensorRT provider on this machine."""


def tensorrt_available() -> tuple[bool, str]:
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in avail:
        return False, (
            "TensorRT needs onnxruntime-gpu with the TensorRT libraries on a GPU node "
            f"(pip install 'mmpipe[gpu]'); this machine's providers are {', '.join(avail)}"
        )
    return True, "TensorrtExecutionProvider"


def _shape_feeds(pkg: ModelPackage, profile: str) -> dict[str, np.ndarray]:
    """Zero-ish feeds at one of the profile shapes ('min', 'opt', 'max')."""
    var = pkg.variant("onnx-fp32")
    spec = dict(getattr(var, "trt_profiles", {}) or {})[f"trt_profile_{profile}_shapes"]
    feeds = {}
    for item in spec.split(","):
        name, dims = item.split(":")
        shape = [int(d) for d in dims.split("x")]
        dtype = np.int64 if name in ("input_ids", "attention_mask") else np.float32
        feeds[name] = np.ones(shape, dtype=dtype)
    return feeds


def build_tensorrt(package_dir: str | Path, *, fp16: bool = True, base: str = "onnx-fp32") -> dict[str, Any]:
    """Build (and cache) TensorRT engines for a package; add a ``tensorrt``
    variant with the cache files and the parity report."""
    ok, why = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    from pipeline.engines.onnx_engine import TRT, OnnxRuntimeEngine
    from pipeline.tooling.torch_engine import load_model

    pkg = load_package(package_dir)
    var = pkg.variant(base)
    cache = pkg.root / "tensorrt"
    profiles = dict(getattr(var, "trt_profiles", {}) or {})
    engine = OnnxRuntimeEngine(pkg.path(var.files[0]), providers=[TRT], trt_cache_dir=cache, trt_fp16=fp16,
                               trt_profiles=profiles)
    if engine.provider != TRT:
        raise TensorRTUnavailable(f"TensorRT provider did not start (active: {engine.provider})")
    for profile in ("min", "opt", "max"):
        engine.run(_shape_feeds(pkg, profile))
    engine.close()
    log_event(logger, logging.INFO, "tensorrt_engine_built", fp16=fp16, cache=str(cache.name))
    model = load_model(pkg.path("model/model.safetensors").parent)
    report = check_parity(pkg, model, pkg.path(var.files[0]), "fp16" if fp16 else "fp32",
                          sample_prepared(pkg, None), providers=[TRT])
    print(parity.format_report({"variants": {"tensorrt": report}}))
    if not report["passed"]:
        raise ExportError("TensorRT parity check failed: " + "; ".join(report["failures"]))
    files = sorted(p.relative_to(pkg.root).as_posix() for p in cache.rglob("*") if p.is_file())
    manifest = pkg.manifest
    for rel in files:
        manifest.files[rel] = ""
    manifest.variants["tensorrt"] = Variant(engine="onnxruntime", files=[var.files[0], *files], base=base,
                                            fp16=fp16, trt_profiles=profiles)
    if manifest.parity is None:
        manifest.parity = {"variants": {}}
    manifest.parity.setdefault("variants", {})["tensorrt"] = report
    write_manifest(pkg.root, manifest)
    return report
