"""A Ray Serve application with mmpipe's request path and no work: the
baseline ``bench/serving.py`` measures beside the real app.

``build_echo_app`` wires the same topology as ``deploy/serve``: Serve's HTTP
ingress (the proxy, or HAProxy in throughput mode) -> one replica that reads
the body -> a 2-byte answer.  No Open Inference Protocol parsing, no model.
What it costs per request is what Ray Serve itself costs for that path on
the machine, so the benchmark can tell the framework's share of the online
path from mmpipe's.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response


@serve.deployment(name="echo", ray_actor_options={"num_cpus": 0.25})
class Echo:
    """Stands where mmpipe's server deployment stands; reads the whole body and returns at once."""

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        return Response(b"ok" if len(body) >= 0 else b"", media_type="application/octet-stream")


def build_echo_app(args: dict[str, Any]) -> Application:
    """Serve builder (``import_path: bench.serve_echo:build_echo_app``); no args."""
    return Echo.bind()
