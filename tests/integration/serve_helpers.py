"""Helpers for tests that run ``mmpipe serve`` (Ray Serve) as a real server.

Shared by the Serve tests (tests/integration/test_serve.py) and the fault
suite (tests/faults/): a Serve config for mmpipe's builder, and the
``python -m deploy.serve.cli`` process (what ``mmpipe serve`` runs) on a
free loopback port with its own Ray in a short private temp dir, stopped
with SIGTERM (SIGKILL to its session if it hangs).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def serve_app(name: str, prefix: str, models: list[dict], deployments: list[str] | None = None, *,
              settings: dict[str, Any], deployment_options: dict[str, Any] | None = None) -> dict:
    """One application of a Serve config for mmpipe's builder: its one
    ``server`` deployment (HTTP, gRPC and every model), with a small CPU
    share so a 2-core machine holds it beside the test.  ``deployments`` is
    accepted for older callers and ignored (models no longer get
    deployments of their own); ``deployment_options`` override the server's
    defaults (e.g. ``num_replicas``)."""
    dep: dict[str, Any] = {
        "name": "server", "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0}, "max_ongoing_requests": 128,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 64},
        # A generous window so concurrent test requests visibly batch.
        "user_config": {"max_batch_size": 32, "batch_wait_timeout_s": 0.1},
    }
    if deployment_options and "num_replicas" in deployment_options:
        dep.pop("autoscaling_config")
    dep.update(deployment_options or {})
    return {
        "name": name, "route_prefix": prefix, "import_path": "deploy.serve.app:build_app",
        "args": {"models": models, "settings": settings},
        "deployments": [dep],
    }


@dataclass
class Server:
    url: str
    hostport: str
    grpc: str
    proc: subprocess.Popen
    log: Path
    ray_tmp: Path


def serve_config(port: int, applications: list[dict], grpc_port: int | None = None) -> dict:
    cfg: dict[str, Any] = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
                           "applications": applications}
    if grpc_port is not None:
        cfg["grpc_options"] = {"port": grpc_port}
    return cfg


@contextlib.contextmanager
def running_serve(applications: list[dict], work: Path, *, num_cpus: int = 2, timeout_s: float = 300,
                  throughput_mode: str | None = None) -> Iterator[Server]:
    """``mmpipe serve`` on free HTTP and gRPC ports with ``applications``;
    yields once it printed ``ready`` and stops it (SIGTERM, then its
    session) on exit.  ``throughput_mode``: on/off (default: the
    ``MMPIPE_TEST_THROUGHPUT_MODE`` environment variable, else the command's
    default).  Raises AssertionError with the log's tail when it does not start."""
    port, grpc_port = free_port(), free_port()
    cfg = work / "serve.yaml"
    cfg.write_text(yaml.safe_dump(serve_config(port, applications, grpc_port), sort_keys=False))
    mode = throughput_mode or os.environ.get("MMPIPE_TEST_THROUGHPUT_MODE")
    # Ray's socket paths must stay under 107 characters: a short temp dir.
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmr", dir="/tmp"))
    log = work / "serve.log"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.serve.cli", "--config", str(cfg), "--num-cpus", str(num_cpus),
             *(["--throughput-mode", mode] if mode else [])],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    srv = Server(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc, log, ray_tmp)
    try:
        deadline = time.monotonic() + timeout_s
        while not re.search(r"^ready", log.read_text(errors="replace"), re.M):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mmpipe serve did not start (rc={proc.poll()}):\n{log.read_text()[-6000:]}")
            time.sleep(0.5)
        yield srv
    finally:
        stop_serve(srv)


def stop_serve(srv: Server) -> None:
    """SIGTERM the command; SIGKILL its session (the Ray daemons it started) if it hangs."""
    proc = srv.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI's own session: Ray's daemons it started
            proc.wait(10)
    shutil.rmtree(srv.ray_tmp, ignore_errors=True)
