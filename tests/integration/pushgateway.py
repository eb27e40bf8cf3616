"""A real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``) for the
integration tests: found (or installed with apt-get when we are root, as
``.ci/bootstrap.sh test`` does), run on a free loopback port without
persistence, and read back through its ``/metrics`` page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from pipeline.ports import free_port
from tests.integration.prometheus import apt_install

DEBIAN_PATH = Path("/usr/bin/prometheus-pushgateway")


def _find() -> str | None:
    found = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if found:
        return found
    return str(DEBIAN_PATH) if os.access(DEBIAN_PATH, os.X_OK) else None


def pushgateway_binary() -> tuple[str | None, str]:
    """(path of the binary or None, why it is missing)."""
    found = _find()
    if found:
        return found, ""
    return apt_install("prometheus-pushgateway", _find)


class Pushgateway:
    """One pushgateway process on a free loopback port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        log = (self.workdir / "pushgateway.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pushgateway exited: {(self.workdir / 'pushgateway.log').read_text()[-500:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("pushgateway did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def value(self, name: str, **labels: str) -> float | None:
        """The value of ``name`` whose labels include ``labels`` (first match)."""
        for line in self.metrics().splitlines():
            m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
            if not m:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if all(have.get(k) == v for k, v in labels.items()):
                return float(m.group(2))
        return None
