"""Workload specifications: labels, heads, thresholds, preprocessing, limits.

A workload (medical, retail, media) is the same machinery with a different
label set, thresholds, preprocessing and privacy rules.  The spec travels
inside every model package's manifest, so serving never needs the YAML file
the model was trained from.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Limits
from pipeline.errors import ConfigError

Modality = Literal["text", "image", "audio", "tabular"]
MODALITY_ORDER: tuple[str, ...] = ("text", "image", "audio", "tabular")
BUILTIN_WORKLOADS = ("medical", "retail", "media")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPrep(_Strict):
    max_length: int = Field(64, ge=4, le=4096)
    lowercase: bool = True


class ImagePrep(_Strict):
    size: int = Field(64, ge=8, le=1024, description="square side after resize")
    channels: Literal[1, 3] = 3
    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25])
    video_frames: int = Field(4, ge=1, le=16, description="keyframes tiled into one image for video")
    dicom_window: Literal["auto", "minmax"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> ImagePrep:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class AudioPrep(_Strict):
    sample_rate: int = Field(16_000, ge=4000, le=96_000)
    max_seconds: float = Field(4.0, gt=0, le=60, description="clip length fed to the model")
    n_mels: int = Field(32, ge=8, le=256)
    n_fft: int = Field(512, ge=64, le=8192)
    hop_length: int = Field(160, ge=16, le=4096)

    @property
    def frames(self) -> int:
        return 1 + int(self.sample_rate * self.max_seconds) // self.hop_length


class TabularPrep(_Strict):
    """Named numeric features, scaled as (x - mean) / std; absent fields are 0."""

    fields: list[str]
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _check(self) -> TabularPrep:
        if not (len(self.fields) == len(self.mean) == len(self.std)):
            raise ValueError("tabular fields, mean and std must have equal length")
        return self


class Preprocessing(_Strict):
    text: TextPrep | None = None
    image: ImagePrep | None = None
    audio: AudioPrep | None = None
    tabular: TabularPrep | None = None

    def modalities(self) -> list[str]:
        return [m for m in MODALITY_ORDER if getattr(self, m) is not None]


class HeadSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    type: Literal["multiclass", "multilabel", "token"]
    labels: list[str] = Field(min_length=2)
    threshold: float = Field(0.5, ge=0, le=1, description="multilabel default threshold")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per-label overrides")
    top_k: int = Field(3, ge=1, description="multiclass: how many labels to return")

    @model_validator(mode="after")
    def _check(self) -> HeadSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"head {self.name}: labels must be unique")
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"head {self.name}: thresholds for unknown labels {sorted(unknown)}")
        if self.type == "token" and self.labels[0] != "O":
            raise ValueError(f"token head {self.name}: first label must be 'O' (outside)")
        return self

    def threshold_for(self, label: str) -> float:
        return self.thresholds.get(label, self.threshold)


class Privacy(_Strict):
    """Records are never logged; ``hash_ids`` also hides record ids in logs
    (medical ids are often accession numbers)."""

    hash_ids: bool = False


class GenerationSpec(_Strict):
    """A workload's generative head: what it writes and how long it may get.

    ``target`` names the text the built-in sample data teaches it (medical
    ``impression``, retail ``title``, media ``caption``); a custom workload
    brings its own targets in its labels file.  The lengths are the head's
    training budget; serving limits are the ``generate`` config section,
    which may only be tighter.  Generated text is record content: it is never
    logged, whatever the workload."""

    head: str = Field("draft", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    target: str = Field("text", min_length=1, max_length=64)
    max_prompt_tokens: int = Field(64, ge=1, le=2048, description="history + question, in decoder tokens")
    max_new_tokens: int = Field(24, ge=1, le=2048, description="answer tokens trained for")


class WorkloadSpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    description: str = ""
    preprocessing: Preprocessing
    heads: list[HeadSpec] = Field(min_length=1)
    limits: Limits = Field(default_factory=Limits)
    privacy: Privacy = Field(default_factory=Privacy)
    accepts_video: bool = Field(False, description="video field is decoded into keyframes")
    accepts_dicom: bool = Field(False, description="image field may be DICOM")
    model: dict = Field(default_factory=dict, description="default model settings for training")
    generation: GenerationSpec | None = Field(
        None, description="a generative head can be trained for this workload (mmpipe train --generative)")

    @model_validator(mode="after")
    def _check(self) -> WorkloadSpec:
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError("head names must be unique")
        if any(h.type == "token" for h in self.heads) and self.preprocessing.text is None:
            raise ValueError("a token head needs text preprocessing")
        if self.accepts_video and self.preprocessing.image is None:
            raise ValueError("video input needs image preprocessing")
        if not self.preprocessing.modalities():
            raise ValueError("a workload needs at least one modality")
        if self.generation is not None and self.generation.head in names:
            raise ValueError(f"generation head {self.generation.head!r} clashes with a tagging head's name")
        return self

    @property
    def modalities(self) -> list[str]:
        return self.preprocessing.modalities()


def load_workload(name_or_path: str | Path) -> WorkloadSpec:
    """A built-in workload by name, or a workload YAML file by path."""
    text: str
    if str(name_or_path) in BUILTIN_WORKLOADS:
        text = resources.files("pipeline.workloads").joinpath(f"{name_or_path}.yaml").read_text()
        origin = f"built-in workload {name_or_path}"
    else:
        p = Path(name_or_path)
        if not p.is_file():
            raise ConfigError(
                f"unknown workload {str(name_or_path)!r}: use one of {', '.join(BUILTIN_WORKLOADS)} "
                "or a path to a workload YAML file"
            )
        text = p.read_text()
        origin = str(p)
    try:
        data = yaml.safe_load(text)
        return WorkloadSpec.model_validate(data)
    except Exception as exc:
        raise ConfigError(f"invalid workload spec in {origin}: {exc}") from exc
