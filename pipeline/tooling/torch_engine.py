"""PyTorch engine: the reference every export is compared against."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.log import log_event

logger = logging.getLogger(__name__)


def load_model(model_dir: Path):  # -> FusionModel (torch imported lazily)
    """Rebuild a FusionModel from ``config.json`` + ``model.safetensors``."""
    from safetensors.torch import load_file

    from pipeline.tooling.model.config import FusionConfig
    from pipeline.tooling.model.fusion import FusionModel

    cfg = FusionConfig.model_validate(json.loads((model_dir / "config.json").read_text()))
    model = FusionModel(cfg)
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model


class TorchEngine:
    name = "torch"

    def __init__(self, model_dir: Path, device: str = "auto", threads: int = 0) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        want_cuda = device in ("auto", "cuda")
        if want_cuda and torch.cuda.is_available():
            self.device = torch.device("cuda")
        else:
            if device == "cuda":
                log_event(logger, logging.WARNING, "cuda_unavailable_fallback_cpu", engine="torch")
            self.device = torch.device("cpu")
        self.provider = self.device.type
        self.model = load_model(model_dir).to(self.device)
        self._torch = torch

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.model.input_names]
            outs = self.model(*args)
        return {n: o.float().cpu().numpy() for n, o in zip(self.model.output_names, outs, strict=True)}

    def close(self) -> None:
        self.model = None
