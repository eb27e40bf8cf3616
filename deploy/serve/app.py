"""``deploy.serve.app:build_app``: the application a Serve config names.

One deployment, ``server``, holds every model of the application and
answers HTTP and gRPC itself: a request goes proxy -> replica -> engine, one
hop (``deploy/serve/README.md`` says why and what it measured).  Each model
keeps its own dynamic batching; readiness is per model (a model whose
package fails to load answers 503, the others serve).  Models that need
their own replica count, autoscaling or GPU share are served as their own
applications (each its own ``route_prefix``), which Serve scales apart.

``args`` (see :class:`deploy.serve.config.AppArgs`)::

    models:
      - package: /models/retail        # name and workload from the manifest
      - package: /models/medical
        name: medical-fusion           # optional overrides
    config: /etc/mmpipe/settings.yaml  # optional mmpipe settings file
    settings: {limits: {max_request_bytes: 33554432}}   # optional, inline

Package manifests are read here (name and workload, no checksums) unless
both are given; the replicas verify the full package when they load it.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deploy.serve.config import AppArgs, ModelRoute, resolve_settings
from deploy.serve.ingress import Server
from pipeline.errors import ConfigError


def _route(m: Any) -> ModelRoute:
    name, workload = m.name, m.workload
    if name is None or workload is None:
        from pathlib import Path

        from pipeline.package import read_manifest

        manifest = read_manifest(Path(m.package))
        name = name or manifest.name
        workload = workload or manifest.workload.name
    return ModelRoute(package=m.package, name=name, workload=workload)


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The Serve application for ``args`` (a dict from a Serve config, or
    :class:`AppArgs`)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    settings = resolve_settings(parsed).model_dump(mode="json")
    routes = [_route(m) for m in parsed.models]
    seen: dict[str, str] = {}
    for r in routes:
        if r.name in seen.values():
            raise ConfigError(f"two packages are served as model {r.name!r}: give one a 'name'")
        if r.workload in seen:
            raise ConfigError(
                f"models {seen[r.workload]!r} and {r.name!r} both serve workload {r.workload!r}, so "
                f"/v1/{r.workload}/predict would be ambiguous: serve them in separate applications"
            )
        seen[r.workload] = r.name
    return Server.bind([r.model_dump() for r in routes], settings)
