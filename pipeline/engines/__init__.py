"""Engines behind one interface; ``create_engine`` picks one from config."""

from __future__ import annotations

from pipeline.config import EngineConfig
from pipeline.engines.base import Engine
from pipeline.package import ModelPackage


def create_engine(package: ModelPackage, cfg: EngineConfig) -> Engine:
    """Build the configured engine for a verified package."""
    if cfg.kind == "torch":
        from pipeline.engines.torch_engine import TorchEngine

        variant = package.variant("torch")
        model_dir = package.path(variant.files[0]).parent
        return TorchEngine(model_dir, device=cfg.device, threads=cfg.threads)
    raise ValueError(
        f"engine {cfg.kind!r} is not available for package {package.name}: "
        f"variants present are {sorted(package.manifest.variants)}"
    )


__all__ = ["Engine", "create_engine"]
