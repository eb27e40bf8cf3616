"""Typed arguments of the Serve application (the ``args:`` of a Serve config).

Ray Serve's own YAML carries everything Ray knows how to apply per
deployment (replicas, autoscaling, actor resources, ``user_config``); the
``args`` say *what* to serve: the model packages and mmpipe's settings
(engine, limits, log level).  Kept free of Ray imports so the CLI and tests
can validate a config before starting anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Limits, MediaConfig, Settings, load_settings
from pipeline.oip import ENSEMBLE_SUFFIX  # noqa: F401  (re-exported: NAME_ensemble takes raw records)

SERVER = "server"
"""Deployment name of the server (HTTP + gRPC + the models; what a Serve
config's ``deployments`` entry names)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelArgs(_Strict):
    """One model package to serve."""

    package: str = Field(description="model package directory (absolute, or relative to where the app is built)")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$",
        description="served model name; default: the package's name (as Triton names it)",
    )
    workload: str | None = Field(
        None, description="workload of /v1/{workload}/predict; default: the package's workload",
    )


class UserConfig(_Strict):
    """The server deployment's ``user_config``: applied by ``reconfigure``
    without restarting replicas, so batching can be tuned on a live service."""

    max_batch_size: int = Field(16, ge=1, le=4096, description="requests merged into one engine call at most")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="how long a batch may wait for requests the server is already reading "
        "(it never waits for requests that have not arrived)",
    )


class AppArgs(_Strict):
    """``args`` of ``deploy.serve.app:build_app``.

    ``config`` is an mmpipe settings file (``MMPIPE__*`` environment
    overrides apply, as on every path); ``settings`` is the same mapping
    inline and wins over the file key by key.  Settings are resolved once,
    where the application is built, and handed to every replica, so all
    replicas of one deployment run one configuration."""

    models: list[ModelArgs] = Field(min_length=1)
    config: str | None = Field(None, description="mmpipe settings YAML")
    settings: dict[str, Any] = Field(default_factory=dict, description="inline mmpipe settings")

    @model_validator(mode="after")
    def _unique(self) -> AppArgs:
        names = [m.name for m in self.models if m.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        return self


class ModelRoute(_Strict):
    """A served model: its package, name and workload (read from the
    manifest when the args do not say)."""

    package: str
    name: str
    workload: str


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_settings(args: AppArgs) -> Settings:
    """mmpipe settings of the application.

    Serving runs ONNX Runtime unless the settings name an engine: the
    ``auto`` choice falls back to PyTorch for a package without ONNX
    variants, and serving images carry no torch."""
    if args.config is not None:
        base = load_settings(args.config).model_dump(mode="json", exclude_unset=True)
        settings = Settings.model_validate(_deep_merge(base, args.settings))
    else:
        settings = Settings.model_validate(args.settings)
    if "kind" not in settings.engine.model_fields_set:
        settings.engine.kind = "onnxruntime"
    return settings


def request_limits(settings: Settings) -> Limits:
    """Limits the ingress enforces before a request reaches a model
    (body size, records per request); workloads add their own per record."""
    return Limits().merged(settings.limits)


ONLINE_MEDIA = MediaConfig(allowed_uri_schemes=[])
"""Online callers must not make the server read its own files or reach out
to object stores: media come inline (base64 or upload) only."""


def absolute_packages(args: dict[str, Any], base: Path) -> dict[str, Any]:
    """``args`` with relative package and config paths made absolute against
    ``base``: replicas may start in another working directory than the
    command that deployed them."""
    out = dict(args)
    if isinstance(out.get("config"), str) and not Path(out["config"]).is_absolute():
        out["config"] = str((base / out["config"]).resolve())
    models = []
    for m in out.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("package"), str) and not Path(m["package"]).is_absolute():
            m = {**m, "package": str((base / m["package"]).resolve())}
        models.append(m)
    if "models" in out:
        out["models"] = models
    return out
