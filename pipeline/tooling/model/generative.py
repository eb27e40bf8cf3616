"""The generative head's three graphs as PyTorch modules, and the PyTorch
backend of the decoding loop.

The same three modules are what ``exporters.generative`` exports, so the
ONNX graphs and the PyTorch reference compute one function by construction
and parity compares engines, not two implementations:

* ``EncoderGraph``: the fusion inputs -> ``prefix_embeds`` [B, P, E];
* ``DecoderInitGraph``: prefix + prompt ids -> last-position logits and
  the cache (``present_key_i`` / ``present_value_i`` per layer);
* ``DecoderStepGraph``: new ids + the cache (``past_key_i`` /
  ``past_value_i``) -> last-position logits and the longer cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.tooling.model.fusion import FusionModel


def cache_names(n_layer: int, kind: str) -> list[str]:
    """``past`` or ``present`` key/value tensor names, in graph order."""
    return [f"{kind}_{t}_{i}" for i in range(n_layer) for t in ("key", "value")]


def _flat(cache: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
    return tuple(t for kv in cache for t in kv)


class EncoderGraph(nn.Module):
    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model
        self.input_names = list(model.input_names)
        self.output_names = ["prefix_embeds"]

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.model.encode_prefix(*inputs)


class DecoderInitGraph(nn.Module):
    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        n = model.cfg.generative.n_layer  # type: ignore[union-attr]
        self.input_names = ["prefix_embeds", "input_ids", "attention_mask", "position_ids"]
        self.output_names = ["logits", *cache_names(n, "present")]

    def forward(self, prefix_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor
                ) -> tuple[Tensor, ...]:
        embeds = torch.cat([prefix_embeds, self.decoder.embed(input_ids)], dim=1)
        logits, cache = self.decoder(embeds, attention_mask, position_ids)
        return (logits[:, -1], *_flat(cache))


class DecoderStepGraph(nn.Module):
    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        n = model.cfg.generative.n_layer  # type: ignore[union-attr]
        self.input_names = ["input_ids", "attention_mask", "position_ids", *cache_names(n, "past")]
        self.output_names = ["logits", *cache_names(n, "present")]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
                ) -> tuple[Tensor, ...]:
        cache = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        logits, cache = self.decoder(self.decoder.embed(input_ids), attention_mask, position_ids, cache)
        return (logits[:, -1], *_flat(cache))


class TorchBackend:
    """PyTorch eager behind ``pipeline.generate.DecoderBackend`` (the
    reference for parity and the baseline of ``bench/generate.py``)."""

    provider = "torch"

    def __init__(self, model: FusionModel) -> None:
        model.eval()
        self.encoder = EncoderGraph(model)
        self.init = DecoderInitGraph(model)
        self.stepper = DecoderStepGraph(model)

    @torch.inference_mode()
    def encode(self, feeds: dict[str, np.ndarray]) -> Tensor:
        return self.encoder(*[torch.as_tensor(feeds[n]) for n in self.encoder.input_names])

    @torch.inference_mode()
    def first(self, prefix: Tensor, input_ids: np.ndarray, attention_mask: np.ndarray,
              position_ids: np.ndarray) -> tuple[np.ndarray, Any]:
        out = self.init(prefix, *(torch.from_numpy(a) for a in (input_ids, attention_mask, position_ids)))
        return out[0].numpy(), out[1:]

    @torch.inference_mode()
    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             cache: Any) -> tuple[np.ndarray, Any]:
        out = self.stepper(*(torch.from_numpy(a) for a in (input_ids, attention_mask, position_ids)), *cache)
        return out[0].numpy(), out[1:]
