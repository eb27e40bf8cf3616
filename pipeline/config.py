"""One typed configuration shared by every path.

Read from a YAML file, then overridden by environment variables of the form
``MMPIPE__SECTION__KEY=value`` (double underscores separate levels; values
are parsed as YAML scalars, so ``MMPIPE__ENGINE__THREADS=2`` is an int).
Environment overrides exist because Kubernetes injects settings that way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError

ENV_PREFIX = "MMPIPE__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Hard limits, checked *before* any decode so a hostile input cannot make
    a worker allocate unbounded memory (decompression bombs, huge audio)."""

    max_text_chars: int = Field(20_000, gt=0)
    max_image_bytes: int = Field(20 * 2**20, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_audio_bytes: int = Field(20 * 2**20, gt=0)
    max_audio_seconds: float = Field(120.0, gt=0)
    max_video_bytes: int = Field(200 * 2**20, gt=0)
    max_video_seconds: float = Field(3600.0, gt=0)
    max_tabular_fields: int = Field(256, gt=0)
    max_record_bytes: int = Field(64 * 2**20, gt=0)
    max_batch_records: int = Field(512, gt=0)
    max_request_bytes: int = Field(100 * 2**20, gt=0)

    def merged(self, override: Limits | None) -> Limits:
        """Fields explicitly set in ``override`` win over this object's."""
        if override is None:
            return self
        data = self.model_dump()
        data.update({k: getattr(override, k) for k in override.model_fields_set})
        return Limits(**data)


class MediaConfig(_Strict):
    """Where media referenced by URI may come from.

    Online callers must not be able to make the server read its own files, so
    URIs are off unless a scheme is listed; ``file`` URIs are additionally
    confined below ``uri_root`` when it is set.
    """

    allowed_uri_schemes: list[str] = Field(default_factory=lambda: ["file"])
    uri_root: Path | None = None


class EngineConfig(_Strict):
    """Which engine runs the model, and how.

    ``variant`` picks the package's ONNX variant for ``onnxruntime``
    (``auto``: fp16 when a GPU provider is active, else fp32)."""

    kind: Literal["auto", "torch", "onnxruntime", "triton"] = Field(
        "auto", description="auto: onnxruntime when the package has ONNX variants, else torch"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="intra-op threads; 0 = library default")
    variant: Literal["auto", "fp32", "fp16", "int8"] = "auto"
    providers: list[str] | None = Field(
        None, description="onnxruntime providers in order; default TensorRT, CUDA, CPU"
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    trt_cache_dir: Path | None = Field(None, description="TensorRT engine cache (default: PACKAGE/tensorrt)")
    trt_fp16: bool = True
    triton_url: str | None = Field(None, description="host:port; default localhost:8001 (grpc) / :8000 (http)")
    triton_model: str | None = Field(None, description="default: the package name; NAME_cpu on python-only servers")
    triton_model_version: str = ""
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_timeout_s: float = Field(10.0, gt=0)
    triton_retries: int = Field(3, ge=0)
    triton_backoff_s: float = Field(0.2, ge=0)


class PredictConfig(_Strict):
    batch_size: int = Field(32, gt=0)


class MetricsConfig(_Strict):
    enabled: bool = True
    port: int | None = Field(None, description="serve /metrics on this port (CLI/stream)")


class Settings(_Strict):
    model_package: Path | None = None
    engine: EngineConfig = Field(default_factory=EngineConfig)
    limits: Limits | None = None
    media: MediaConfig = Field(default_factory=MediaConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[keys[-1]] = value


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Load settings from an optional YAML file plus ``MMPIPE__*`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
        data = loaded
    env = dict(os.environ) if env is None else env
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        _set_path(data, keys, value)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration:\n{exc}") from exc
