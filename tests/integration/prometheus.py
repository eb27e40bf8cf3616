"""A real Prometheus server (Debian's ``prometheus``) for the integration tests.

``prometheus_binary()`` finds the binary, installing Debian's package when it
is missing and we are root with apt-get (as ``.ci/bootstrap.sh test`` does);
``PrometheusServer`` runs it on a free loopback port, scraping one target's
``/metrics`` every second with its TSDB in a temporary directory, and answers
PromQL instant queries through the HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.ports import free_port

DEBIAN_PATH = Path("/usr/bin/prometheus")


def _find() -> str | None:
    found = shutil.which("prometheus")
    if found:
        return found
    return str(DEBIAN_PATH) if os.access(DEBIAN_PATH, os.X_OK) else None


def prometheus_binary(install: bool = True) -> tuple[str | None, str]:
    """(path of the prometheus binary or None, why it is missing).

    When missing, install Debian's package if ``install`` and we are root
    with apt-get (``apt-get update`` first only if a plain install fails).
    The package's service start is refused in containers; only the binary
    is needed."""
    found = _find()
    if found:
        return found, ""
    if not install:
        return None, "prometheus is not installed"
    return apt_install("prometheus", _find)


def apt_install(package: str, find: Callable[[], str | None]) -> tuple[str | None, str]:
    """Install a Debian package for a test server when we are root with
    apt-get (``apt-get update`` first only if a plain install fails), then
    ``find()`` its binary: (path or None, why it is missing)."""
    if not shutil.which("apt-get"):
        return None, f"{package} is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return None, f"{package} is not installed and installing it (apt-get install {package}) needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
    tail = ""
    for update_first in (False, True):
        try:
            if update_first:
                subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
            tail = (res.stdout + res.stderr)[-500:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            tail = f"{type(exc).__name__}: {exc}"
        found = find()
        if found:
            return found, ""
    return None, f"{package} is not installed and apt-get install {package} failed: {tail.strip()}"


class PrometheusServer:
    """One Prometheus process scraping ``target`` (``host:port``) at ``metrics_path``."""

    def __init__(self, binary: str, target: str, *, metrics_path: str = "/metrics",
                 scrape_interval_s: int = 1, job: str = "mmpipe") -> None:
        self.binary = binary
        self.target = target
        self.metrics_path = metrics_path
        self.scrape_interval_s = scrape_interval_s
        self.job = job
        self.port = 0
        self.url = ""
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None

    @property
    def log(self) -> str:
        """The server's own log so far (for failure messages)."""
        if self.workdir is None or not (self.workdir / "prometheus.log").exists():
            return ""
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def start(self, timeout_s: float = 60) -> PrometheusServer:
        self.workdir = Path(tempfile.mkdtemp(prefix="mmprom"))
        interval = f"{self.scrape_interval_s}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [{
                "job_name": self.job, "scrape_interval": interval, "scrape_timeout": interval,
                "metrics_path": self.metrics_path, "static_configs": [{"targets": [self.target]}],
            }],
        }
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with (self.workdir / "prometheus.log").open("wb") as fh:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                log = self.log
                self.stop()
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{log}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                log = self.log
                self.stop()
                raise RuntimeError(f"prometheus was not ready within {timeout_s} s:\n{log}")
            time.sleep(0.2)

    def _api(self, endpoint: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{endpoint}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the reason in the body
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {endpoint} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """The instant vector of ``promql`` now: ``[{"metric": {...}, "value": [ts, "v"]}, ...]``."""
        data = self._api("query", query=promql)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict]:
        """The active scrape targets (``health``, ``lastError``, ``scrapeUrl`` ...)."""
        return self._api("targets")["activeTargets"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
