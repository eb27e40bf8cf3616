"""Start and stop a ``tritonserver`` on a model repository.

Used by ``mmpipe serve --backend triton`` and by the integration tests.  The
binary is, in this order: an explicit path, ``tritonserver`` on ``PATH`` (an
NGC image or any full install, with its own backends), or the one the
nvidia-pytriton wheel ships.

The wheel carries Triton 2.5x with the python backend only (no onnxruntime
backend), so with it only the python-backend models of a repository built by
``exporters.triton_repo`` load (``NAME_cpu``, ``NAME_preprocess``,
``NAME_ensemble_cpu``).  What it takes to run that binary outside pytriton
(what pytriton itself does):

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

The server runs in its own process group and is stopped with that group
(python-backend stubs included): SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.ports import free_ports


class TritonUnavailable(Exception):
    """No tritonserver binary: nvidia-pytriton is not installed (or the given
    path is not an executable)."""


@dataclass(frozen=True)
class TritonDist:
    """Where the nvidia-pytriton wheel keeps the server, its backends, stubs and libraries."""

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
            "it carries a tritonserver binary"
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
    """The environment the wheel's binary and its python stubs need."""
    env = dict(os.environ)
    ld = [str(libpython_dir()), str(dist.libs)]
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(ld)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@dataclass(frozen=True)
class ServerInstall:
    """A runnable tritonserver: the binary, where its backends and caches are
    (None: the binary's defaults) and the environment to start it with."""

    binary: Path
    env: dict[str, str]
    backend_dir: Path | None = None
    cache_dir: Path | None = None
    source: str = "path"  # "pytriton" | "path" | "explicit"


def _pytriton_install(workdir: Path, onnxruntime_standin: Path | None = None) -> ServerInstall:
    dist = find_dist()
    tree = prepare_tree(dist, workdir / "tritonserver")
    if onnxruntime_standin is not None:
        install_onnxruntime_standin(tree, onnxruntime_standin)
    return ServerInstall(binary=tree / "bin" / "tritonserver", env=server_env(dist),
                         backend_dir=tree / "backends", cache_dir=tree / "caches", source="pytriton")


def find_server(workdir: Path, tritonserver: str | Path | None = None, *, prefer_pytriton: bool = False,
                onnxruntime_standin: Path | None = None) -> ServerInstall:
    """Locate a tritonserver and make it runnable.

    ``tritonserver``: an explicit binary (used as it is, with its own
    backends).  Otherwise ``tritonserver`` on ``PATH``, else the
    nvidia-pytriton wheel's binary, copied under ``workdir`` with the python
    stub for this interpreter (``prefer_pytriton``: the wheel first, as the
    tests want).  Raises :class:`TritonUnavailable` when there is none."""
    if tritonserver is not None:
        p = Path(tritonserver)
        if not (p.is_file() and os.access(p, os.X_OK)):
            raise TritonUnavailable(f"--tritonserver {p}: not an executable file")
        return ServerInstall(binary=p.resolve(), env=dict(os.environ), source="explicit")
    on_path = shutil.which("tritonserver")
    if on_path and not prefer_pytriton:
        return ServerInstall(binary=Path(on_path), env=dict(os.environ), source="path")
    try:
        return _pytriton_install(workdir, onnxruntime_standin)
    except TritonUnavailable:
        if on_path:
            return ServerInstall(binary=Path(on_path), env=dict(os.environ), source="path")
        raise TritonUnavailable(
            "no tritonserver binary found: pass --tritonserver PATH, put tritonserver on PATH (e.g. the "
            "nvcr.io/nvidia/tritonserver image), or pip install nvidia-pytriton (python backend only)"
        ) from None


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


def repository_model_names(repo: Path, *, cpu_only: bool = False) -> list[str]:
    """The models of a repository (directories with a ``config.pbtxt``);
    ``cpu_only``: only those the python backend serves (``*_cpu``,
    ``*_preprocess``, ``*_ensemble_cpu``, ``*_generate``), for servers
    without the onnxruntime backend."""
    names = sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt") if not p.parent.name.startswith("."))
    if cpu_only:
        names = [n for n in names if n.endswith(("_cpu", "_preprocess", "_generate"))]
    return names


def command(install: ServerInstall, repo: Path, models: Sequence[str], *, host: str = "127.0.0.1",
            http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
            extra: Sequence[str] = ()) -> list[str]:
    """The tritonserver command line: explicit model control loading
    ``models``, strict readiness, exit on load errors, CPU metrics."""
    cmd = [
        str(install.binary),
        f"--model-repository={repo}", "--model-control-mode=explicit",
        *[f"--load-model={m}" for m in models],
    ]
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if install.cache_dir is not None:
        cmd.append(f"--cache-directory={install.cache_dir}")
    cmd += [
        f"--http-address={host}", f"--http-port={http_port}",
        f"--grpc-address={host}", f"--grpc-port={grpc_port}",
        f"--metrics-address={host}", f"--metrics-port={metrics_port}",
        "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
        "--metrics-interval-ms=500",
        "--disable-auto-complete-config", "--strict-readiness=true", "--exit-on-error=true",
        "--exit-timeout-secs=10", "--log-verbose=0",
        *extra,
    ]
    return cmd


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


@dataclass
class TritonServer:
    """A running tritonserver process group."""

    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path | None
    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def http_url(self) -> str:
        return f"{_local(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_local(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_local(self.host)}:{self.metrics_port}/metrics"

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def group_alive(self) -> bool:
        """Whether any live process of the server's group (server, stubs) is left."""
        return group_has_live_members(self.proc.pid)

    def ready(self) -> bool:
        return _ready(self.http_url, self.models)

    def wait_ready(self, timeout_s: float, stop: Callable[[], bool] | None = None) -> bool:
        """Poll until the server and every model in ``models`` are ready;
        False when the server exits, the time runs out or ``stop()`` says so."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive() or (stop is not None and stop()):
                return False
            if self.ready():
                return True
            time.sleep(0.25)
        return False

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the group (Triton unloads models and stops its stubs), then
        SIGKILL whatever is left after ``grace_s``.  Returns the server's exit
        status (negative: killed by that signal)."""
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        deadline = time.monotonic() + 5.0
        while group_has_live_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return self.proc.returncode


def group_has_live_members(pgid: int) -> bool:
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


def _ready(url: str, models: Iterable[str]) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
            if r.status != 200:
                return False
        for m in models:
            with urllib.request.urlopen(f"http://{url}/v2/models/{m}/ready", timeout=2) as r:
                if r.status != 200:
                    return False
    except (urllib.error.URLError, OSError):
        return False
    return True


def launch(install: ServerInstall, repo: Path, models: Sequence[str], *, cwd: Path, log_path: Path | None = None,
           host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
           extra: Sequence[str] = ()) -> TritonServer:
    """Start the server in its own process group and return at once (see
    :meth:`TritonServer.wait_ready`).  Output goes to ``log_path``, or to
    this process's stdout/stderr when None."""
    cmd = command(install, Path(repo).resolve(), models, host=host, http_port=http_port, grpc_port=grpc_port,
                  metrics_port=metrics_port, extra=extra)
    out = log_path.open("wb") if log_path is not None else None
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, env=install.env, cwd=cwd, start_new_session=True)
    finally:
        if out is not None:
            out.close()
    return TritonServer(proc, http_port, grpc_port, metrics_port, log_path, list(models), host)


def start_server(repo: Path, models: list[str], workdir: Path, *, timeout_s: float = 180.0,
                 attempts: int = 2, onnxruntime_standin: Path | None = None,
                 tritonserver: str | Path | None = None) -> TritonServer:
    """Start tritonserver (the pytriton wheel's unless ``tritonserver`` is
    given) on ``repo`` on free loopback ports, loading only ``models``;
    return once every one of them is ready.  Raises with the server log's
    tail if the server exits or is not ready in time.  A port taken between
    choosing and binding it is retried on fresh ports.
    ``onnxruntime_standin``: see :func:`install_onnxruntime_standin`."""
    install = find_server(workdir, tritonserver, prefer_pytriton=True, onnxruntime_standin=onnxruntime_standin)
    last = ""
    for attempt in range(attempts):
        http, grpc, metrics = free_ports(3)
        server = launch(install, repo, models, cwd=workdir, log_path=workdir / f"tritonserver-{attempt}.log",
                        http_port=http, grpc_port=grpc, metrics_port=metrics)
        atexit.register(server.stop, 5.0)
        try:
            if server.wait_ready(timeout_s):
                return server
        except BaseException:
            server.stop()
            raise
        last = server.log_tail()
        server.stop()
        if "address already in use" not in last.lower():
            break
    raise RuntimeError(f"tritonserver did not become ready (models {models}); log tail:\n{last}")
