"""Engines behind one interface; ``create_engine`` picks one from config."""

from __future__ import annotations

import importlib

from pipeline.config import EngineConfig
from pipeline.engines.base import Engine, EngineUnavailable
from pipeline.package import ModelPackage

TORCH_ENGINE_MODULE = "pipeline.tooling.torch_engine"


def resolve_kind(package: ModelPackage, kind: str) -> str:
    """What ``engine.kind: auto`` means for ``package``: ONNX Runtime when
    the package has an ONNX export, else the PyTorch reference."""
    if kind != "auto":
        return kind
    return "onnxruntime" if "onnx-fp32" in package.manifest.variants else "torch"


def create_engine(package: ModelPackage, cfg: EngineConfig) -> Engine:
    """Build the configured engine for a verified package."""
    kind = resolve_kind(package, cfg.kind)
    if kind == "torch":
        # The PyTorch reference lives with the model family (tooling); it is
        # loaded by name, only when a config asks for it, so the runtime
        # never imports tooling or torch otherwise.
        TorchEngine = importlib.import_module(TORCH_ENGINE_MODULE).TorchEngine

        variant = package.variant("torch")
        model_dir = package.path(variant.files[0]).parent
        return TorchEngine(model_dir, device=cfg.device, threads=cfg.threads)
    if kind == "onnxruntime":
        return _onnx_engine(package, cfg)
    if kind == "triton":
        from pipeline.engines.triton_engine import from_package

        return from_package(package, cfg)
    raise ValueError(
        f"engine {cfg.kind!r} is not available for package {package.name}: "
        f"variants present are {sorted(package.manifest.variants)}"
    )


__all__ = ["Engine", "EngineUnavailable", "create_engine", "resolve_kind"]


def _onnx_engine(package: ModelPackage, cfg: EngineConfig) -> Engine:
    import onnxruntime as ort

    from pipeline.engines.onnx_engine import CPU, OnnxRuntimeEngine, choose_providers

    variant = cfg.variant
    if variant == "auto":
        providers = choose_providers(cfg.providers, cfg.device, ort.get_available_providers(), quiet=True)
        gpu = providers[0] != CPU
        variant = "fp16" if gpu and "onnx-fp16" in package.manifest.variants else "fp32"
    var = package.variant(f"onnx-{variant}")
    trt_cache = cfg.trt_cache_dir or (package.root / "tensorrt")
    return OnnxRuntimeEngine(
        package.path(var.files[0]), device=cfg.device, providers=cfg.providers, threads=cfg.threads,
        graph_optimization=cfg.graph_optimization, trt_cache_dir=trt_cache, trt_fp16=cfg.trt_fp16,
        trt_profiles=getattr(var, "trt_profiles", None), signature=package.manifest.signature.model_dump(),
        spin=cfg.spin is not False,  # auto: on (the stream's CLI resolves auto to off)
    )
