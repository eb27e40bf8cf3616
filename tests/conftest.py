"""Shared fixtures.  Trained models are built once per session (small, fast)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The medical workload pseudonymises record ids with a keyed hash and refuses
# to start without its key; every process the tests start inherits this one.
os.environ.setdefault("MMPIPE_ID_HASH_KEY", "mmpipe-test-suite-id-hash-key-0123456789")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that collected nothing must fail, not pass quietly (pytest's 5)."""
    if session.testscollected == 0 and exitstatus in (0, 5):
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A quickly trained (few steps) package per built-in workload.

    Good enough to exercise every code path; accuracy is tested separately
    by the end-to-end test that trains fully."""
    from exporters.package import build_package
    from pipeline.spec import BUILTIN_WORKLOADS, load_workload
    from pipeline.tooling import sample_data
    from pipeline.tooling.train import train

    root = tmp_path_factory.mktemp("tiny")
    out: dict[str, Path] = {}
    for name in BUILTIN_WORKLOADS:
        spec = load_workload(name)
        samples = sample_data.generate(name, 48, seed=3)
        train(spec, samples, root / f"trained-{name}", max_steps=3, progress=False)
        out[name] = build_package(root / f"trained-{name}", root / f"pkg-{name}").root
    return out


@pytest.fixture(scope="session")
def generative_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A medical package with a generative head, exported with its KV-cache
    graphs (``generate-fp32``), trained briefly: what the paths must prove is
    that they give the same tokens as in-process generation, not quality
    (``tests/e2e/test_generate.py`` holds the trained quality)."""
    from exporters.onnx_export import export_package
    from exporters.package import build_package
    from pipeline.spec import load_workload
    from pipeline.tooling import sample_data
    from pipeline.tooling.train import train

    root = tmp_path_factory.mktemp("generative")
    spec = load_workload("medical")
    train(spec, sample_data.generate("medical", 240, seed=5), root / "trained", epochs=6, generative=True,
          progress=False)
    build_package(root / "trained", root / "pkg")
    pkg, _ = export_package(root / "pkg", ("fp32",))
    return pkg.root


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory):  # -> Iterator[KafkaBroker]
    """A real Apache Kafka broker (KRaft) for the module that asks for one;
    the test fails saying why when it cannot start."""
    pytest.importorskip("kafka")
    from tests.integration.stream_helpers import start_broker

    b = start_broker(tmp_path_factory.mktemp("kafka"))
    yield b
    b.close()
