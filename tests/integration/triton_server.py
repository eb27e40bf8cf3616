"""Start and stop the real ``tritonserver`` that the nvidia-pytriton wheel ships.

The wheel carries Triton 2.5x with the python backend only (no onnxruntime
backend), so tests load the python-backend models of a repository built by
``exporters.triton_repo``.  What it takes to run that binary outside
pytriton (what pytriton itself does):

* a copy of ``pytriton/tritonserver`` (``bin``, ``backends``, ``caches``)
  with the python-backend stub built for *this* interpreter's version placed
  at ``backends/python/triton_python_backend_stub``;
* ``LD_LIBRARY_PATH`` with the wheel's bundled libraries
  (``nvidia_pytriton.libs``) and the running interpreter's ``lib/`` (the
  stub links ``libpython3.X.so.1.0``; with another libpython stubs fail with
  ``_thread.RLock has no attribute _recursion_count``);
* the interpreter's ``bin/`` first on ``PATH``: the stub's embedded Python
  finds its prefix (and so a virtual environment's site-packages, with
  numpy, onnxruntime and mmpipe's dependencies) from ``python3`` on PATH.

The server listens on loopback only, on free ports, runs in its own process
group, and is stopped with that group (stubs included), on failure too.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


class TritonUnavailable(Exception):
    """nvidia-pytriton (and so the tritonserver binary) is not installed."""


@dataclass(frozen=True)
class TritonDist:
    """Where the wheel keeps the server, its backends, stubs and libraries."""

    root: Path
    libs: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    def stub(self, version: str | None = None) -> Path:
        v = version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / v / "triton_python_backend_stub"


def find_dist() -> TritonDist:
    """The tritonserver inside the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable(
            "nvidia-pytriton is not installed (pip install nvidia-pytriton 'tritonclient[grpc,http]'); "
            "it carries the tritonserver binary these tests run"
        )
    pkg = Path(next(iter(spec.submodule_search_locations)))
    root = pkg / "tritonserver"
    libs = pkg.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # editable installs keep them inside the package
        libs = root / "external_libs"
    dist = TritonDist(root=root, libs=libs)
    if not dist.binary.is_file():
        raise RuntimeError(f"nvidia-pytriton is installed but has no server binary at {dist.binary}")
    return dist


def prepare_tree(dist: TritonDist, dest: Path) -> Path:
    """A runnable server tree: the wheel's files plus this Python's stub."""
    stub = dist.stub()
    if not stub.is_file():
        have = sorted(p.name for p in (dist.root / "python_backend_stubs").iterdir())
        raise RuntimeError(f"nvidia-pytriton has no python-backend stub for Python "
                           f"{sys.version_info.major}.{sys.version_info.minor} (it has {have})")
    if not (dest / "bin" / "tritonserver").is_file():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for part in ("bin", "backends", "caches"):
            shutil.copytree(dist.root / part, tmp / part, symlinks=True)
        shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
        tmp.rename(dest)
    return dest


def libpython_dir() -> Path:
    """The directory holding the running interpreter's ``libpython3.X.so.1.0``."""
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    for cand in (Path(sys.base_prefix) / "lib", Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent")):
        if (cand / name).exists():
            return cand
    raise RuntimeError(f"{name} not found beside this interpreter ({sys.base_prefix}); the python-backend "
                       "stub needs a shared libpython (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")


def server_env(dist: TritonDist) -> dict[str, str]:
    env = dict(os.environ)
    ld = [str(libpython_dir()), str(dist.libs)]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (held open together so
    they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class TritonServer:
    """A running tritonserver process group."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    models: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_alive(self) -> bool:
        """Whether any live process of the server's group (server, stubs) is left."""
        return _group_has_live_members(self.proc.pid)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the group (Triton unloads models and stops its stubs), then
        SIGKILL whatever is left after ``grace_s``."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        deadline = time.monotonic() + 5.0
        while _group_has_live_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def _group_has_live_members(pgid: int) -> bool:
    """Any non-zombie process in group ``pgid`` (read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces/parens.
        rest = text.rsplit(")", 1)[-1].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] != "Z":
            return True
    return False


def _ready(port: int, models: Iterable[str]) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
            if r.status != 200:
                return False
        for m in models:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{m}/ready", timeout=2) as r:
                if r.status != 200:
                    return False
    except (urllib.error.URLError, OSError):
        return False
    return True


def install_onnxruntime_standin(tree: Path, model_py: Path) -> None:
    """Install ``model_py`` as a *python-based backend* named ``onnxruntime``.

    The wheel lacks the real onnxruntime backend; with this stand-in Triton
    loads the repository's ``NAME`` model from its exact onnxruntime-backend
    config (instance kind, dynamic batching, warmup files, version policy)
    and ``NAME_ensemble`` wires to it, so Triton core's acceptance of those
    configs is tested on a real server.  What the real backend does with the
    config (TensorRT options, its own sessions) is not tested here."""
    dst = tree / "backends" / "onnxruntime"
    dst.mkdir(exist_ok=True)
    shutil.copyfile(model_py, dst / "model.py")


def start_server(repo: Path, models: list[str], workdir: Path, *, timeout_s: float = 180.0,
                 attempts: int = 2, onnxruntime_standin: Path | None = None) -> TritonServer:
    """Start tritonserver on ``repo`` loading only ``models``; return once
    every one of them is ready.  Raises with the server log's tail if the
    server exits or is not ready in time.  A port taken between choosing and
    binding it is retried on fresh ports.  ``onnxruntime_standin``: see
    :func:`install_onnxruntime_standin`."""
    dist = find_dist()
    tree = prepare_tree(dist, workdir / "tritonserver")
    if onnxruntime_standin is not None:
        install_onnxruntime_standin(tree, onnxruntime_standin)
    env = server_env(dist)
    last = ""
    for attempt in range(attempts):
        http, grpc, metrics = free_ports(3)
        log_path = workdir / f"tritonserver-{attempt}.log"
        cmd = [
            str(tree / "bin" / "tritonserver"),
            f"--model-repository={repo}", "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in models],
            f"--backend-directory={tree / 'backends'}", f"--cache-directory={tree / 'caches'}",
            "--http-address=127.0.0.1", f"--http-port={http}",
            "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
            "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--metrics-interval-ms=500",
            "--disable-auto-complete-config", "--strict-readiness=true", "--exit-on-error=true",
            "--exit-timeout-secs=10", "--log-verbose=0",
        ]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=workdir, start_new_session=True)
        server = TritonServer(proc, http, grpc, metrics, log_path, list(models))
        atexit.register(server.stop, 5.0)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if not server.alive():
                    break
                if _ready(http, models):
                    return server
                time.sleep(0.25)
        except BaseException:
            server.stop()
            raise
        last = server.log_tail()
        server.stop()
        if "address already in use" not in last.lower():
            break
    raise RuntimeError(f"tritonserver did not become ready (models {models}); log tail:\n{last}")


# -- packages with an ONNX variant, shared by the unit and integration tests ----------------------
def onnx_package(src: Path, root: Path, samples: int = 12) -> Path:
    """A copy of package ``src`` under ``root`` with the ``onnx-fp32``
    variant added by the real exporter (parity checked on ``samples``
    generated records).  Reused when it already exists, so the unit and
    integration tests of one session export each workload once."""
    from exporters.onnx_export import export_package
    from pipeline import sample_data
    from pipeline.package import load_package

    dst = root / src.name
    if dst.is_dir():
        try:
            if "onnx-fp32" in load_package(dst).manifest.variants:
                return dst
        except Exception:  # a half-written copy from an interrupted run: redo it
            pass
        shutil.rmtree(dst)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{src.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    workload = load_package(tmp).spec.name
    records = [s.record for s in sample_data.generate(workload, samples, seed=11, missing_rate=0.3)]
    export_package(tmp, ("fp32",), sample_records=records)
    tmp.rename(dst)
    return dst
