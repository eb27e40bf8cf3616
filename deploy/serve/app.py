"""``deploy.serve.app:build_app``: the application a Serve config names.

One deployment per model package, plus an ingress that routes by model
name — chosen over Serve's model multiplexing because:

* each model gets its own autoscaling, replica count and GPU fraction
  (``ray_actor_options.num_gpus``): a busy retail model can scale out while
  a rarely used medical one idles at one replica, and a big model can hold
  a larger GPU share than a small one;
* every model is loaded and checksum-verified when its replicas start, so
  readiness means "can answer now"; multiplexing loads on first request and
  evicts under pressure, turning a cold model into a latency spike or a
  load failure in the middle of serving;
* dynamic batching stays per model (``@serve.batch`` merges calls of one
  signature; a multiplexed replica would have to keep a queue per model);
* a Serve config's ``deployments`` entries name them (``ingress``, then one
  per model name), so operators tune each one in YAML as Ray documents it.

Multiplexing pays off with many rarely used models sharing few GPUs; mmpipe
serves a handful of workloads, each busy.

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
from deploy.serve.ingress import Ingress
from deploy.serve.model import ModelServer
from pipeline.errors import ConfigError


def _route(m: Any) -> ModelRoute:
    name, workload = m.name, m.workload
    if name is None or workload is None:
        from pathlib import Path

        from pipeline.package import read_manifest

        manifest = read_manifest(Path(m.package))
        name = name or manifest.name
        workload = workload or manifest.workload.name
    return ModelRoute(name=name, workload=workload, deployment=name)


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The Serve application for ``args`` (a dict from a Serve config, or
    :class:`AppArgs`)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    settings = resolve_settings(parsed).model_dump(mode="json")
    routes = [_route(m) for m in parsed.models]
    seen: dict[str, str] = {}
    for r in routes:
        if r.name == "ingress":
            raise ConfigError("a model may not be named 'ingress' (the ingress deployment's name)")
        if r.name in seen.values():
            raise ConfigError(f"two packages are served as model {r.name!r}: give one a 'name'")
        if r.workload in seen:
            raise ConfigError(
                f"models {seen[r.workload]!r} and {r.name!r} both serve workload {r.workload!r}, so "
                f"/v1/{r.workload}/predict would be ambiguous: serve them in separate applications"
            )
        seen[r.workload] = r.name
    models = {
        r.name: ModelServer.options(name=r.deployment).bind(m.package, r.name, r.workload, settings)
        for r, m in zip(routes, parsed.models, strict=True)
    }
    return Ingress.bind(models, [r.model_dump() for r in routes], settings)
