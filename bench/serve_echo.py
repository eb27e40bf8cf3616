"""A Ray Serve application with mmpipe's request path and no work: the
baseline ``bench/serving.py`` measures beside the real app.

``build_echo_app`` wires the same topology as ``deploy/serve``: Serve's HTTP
proxy -> an ingress replica that reads the body -> a second deployment
called through a ``DeploymentHandle`` -> a 2-byte answer.  No Open Inference
Protocol parsing, no model.  What it costs per request is what Ray Serve
itself costs for that path on the machine, so the benchmark can tell the
framework's share of the online path from mmpipe's.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response


@serve.deployment(name="echo-model", ray_actor_options={"num_cpus": 0.25})
class EchoModel:
    """Stands where the model deployment stands; returns at once."""

    async def __call__(self, size: int) -> bytes:
        return b"ok" if size >= 0 else b""


@serve.deployment(name="echo-ingress", ray_actor_options={"num_cpus": 0.25})
class EchoIngress:
    """Reads the whole body (as the real ingress does) and makes one handle call."""

    def __init__(self, model: Any) -> None:
        self.model = model

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        return Response(await self.model.remote(len(body)), media_type="application/octet-stream")


def build_echo_app(args: dict[str, Any]) -> Application:
    """Serve builder (``import_path: bench.serve_echo:build_echo_app``); no args."""
    return EchoIngress.bind(EchoModel.bind())
