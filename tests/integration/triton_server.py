"""Test helpers around ``deploy.triton.server``, which starts and stops the
real ``tritonserver`` (the one the nvidia-pytriton wheel ships in tests).

The launch logic (finding the binary, the python stub, ``LD_LIBRARY_PATH`` and
``PATH``, the command line, readiness, process-group shutdown) lives in
``deploy.triton.server`` so ``mmpipe serve --backend triton`` uses the same
code; the names are re-exported here for the tests.  The tests' servers
listen on loopback only, on free ports, and load explicitly named models.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from deploy.triton.server import (
    ServerInstall,
    TritonDist,
    TritonServer,
    TritonUnavailable,
    find_dist,
    find_server,
    free_ports,
    group_has_live_members,
    install_onnxruntime_standin,
    libpython_dir,
    prepare_tree,
    repository_model_names,
    server_env,
    start_server,
)

__all__ = [
    "ServerInstall",
    "TritonDist",
    "TritonServer",
    "TritonUnavailable",
    "find_dist",
    "find_server",
    "free_ports",
    "group_has_live_members",
    "install_onnxruntime_standin",
    "libpython_dir",
    "onnx_package",
    "prepare_tree",
    "repository_model_names",
    "served",
    "server_env",
    "start_server",
]


# -- packages with an ONNX variant, shared by the unit and integration tests ----------------------
def onnx_package(src: Path, root: Path, samples: int = 12) -> Path:
    """A copy of package ``src`` under ``root`` with the ``onnx-fp32``
    variant added by the real exporter (parity checked on ``samples``
    generated records).  Reused when it already exists, so the unit and
    integration tests of one session export each workload once."""
    from exporters.onnx_export import export_package
    from pipeline.package import load_package
    from pipeline.tooling import sample_data

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


@contextlib.contextmanager
def served(srv: TritonServer) -> Iterator[TritonServer]:
    """A started server for a test module: stopped at the end, and no
    tritonserver or python-backend stub may outlive it."""
    try:
        yield srv
    finally:
        srv.stop()
        assert not srv.group_alive(), "tritonserver or a python-backend stub outlived the test module"
