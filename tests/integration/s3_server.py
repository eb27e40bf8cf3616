"""A real S3-compatible server for the tests: versitygw (Apache-2.0), built
once from the Go module proxy (``go install
github.com/versity/versitygw/cmd/versitygw@VERSITYGW_VERSION``, as
``.ci/bootstrap.sh test`` does) and cached beside helm under
``~/.cache/mmpipe/bin``; run as ``versitygw --port 127.0.0.1:PORT posix
DIR`` on a free loopback port, stopped (and restartable on the same port
and directory, for the "store unavailable" cases) by the test.

Never a mock: pyarrow's S3 filesystem and delta-rs talk to it over HTTP the
way they talk to AWS S3 or MinIO.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.ports import free_port
from tests.integration.k8s_tools import BIN, ToolUnavailable, _go_env

VERSITYGW_VERSION = "v1.8.0"
ACCESS_KEY = "mmpipe-test"
SECRET_KEY = "mmpipe-test-secret-key"


def versitygw_binary() -> str:
    """Path of versitygw, building the pinned version with Go if needed."""
    cached = BIN / "versitygw"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    found = shutil.which("versitygw")
    if found:
        return found
    go = shutil.which("go")
    if not go:
        raise ToolUnavailable("versitygw is not installed and Go is not available to build it "
                              f"(go install github.com/versity/versitygw/cmd/versitygw@{VERSITYGW_VERSION})")
    BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([go, "install", f"github.com/versity/versitygw/cmd/versitygw@{VERSITYGW_VERSION}"],
                             cwd=tmp, env=_go_env(), capture_output=True, text=True, timeout=1800, check=False)
    if res.returncode != 0 or not cached.is_file():
        raise ToolUnavailable(f"go install versitygw@{VERSITYGW_VERSION} failed: {(res.stdout + res.stderr)[-800:]}")
    return str(cached)


class S3Server:
    """One versitygw process serving ``root`` (one sub-directory per bucket)."""

    def __init__(self, binary: str, root: Path, port: int | None = None) -> None:
        self.binary, self.root = binary, root
        self.port = port if port is not None else free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def fs_options(self) -> dict[str, Any]:
        """pyarrow S3FileSystem options (``batch.filesystem`` / ``batch.output_filesystem``)."""
        return {"endpoint_override": self.endpoint, "scheme": "http", "access_key": ACCESS_KEY,
                "secret_key": SECRET_KEY, "region": "us-east-1", "allow_bucket_creation": True}

    def filesystem(self) -> Any:
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(**self.fs_options)

    def start(self, timeout_s: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root.parent / f"versitygw-{self.port}.log").open("ab")
        env = {**os.environ, "ROOT_ACCESS_KEY": ACCESS_KEY, "ROOT_SECRET_KEY": SECRET_KEY}
        self.proc = subprocess.Popen([self.binary, "--port", self.endpoint, "posix", str(self.root)],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"versitygw exited with {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("versitygw did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)
