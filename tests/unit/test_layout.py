"""The runtime the three paths import stands apart from the tooling.

Runtime: ``pipeline`` outside ``pipeline/tooling`` (records, decoders,
preprocessing, the columnar batch, engines, the Predictor, postprocessing,
metrics, config, package loading, the batch job and the stream consumer).
It never imports the tooling (training and the model family, sample data,
the demo, verify, the CLI), ``exporters/`` or ``deploy/``, and serving a
package with ONNX Runtime loads neither those nor torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = sorted(p for p in (ROOT / "pipeline").rglob("*.py")
                 if "tooling" not in p.relative_to(ROOT / "pipeline").parts and p.name != "__main__.py")
FORBIDDEN = ("pipeline.tooling", "exporters", "deploy")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


@pytest.fixture(scope="module")
def tiny_onnx_retail(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.integration.triton_server import onnx_package

    return onnx_package(tiny_packages["retail"], tmp_path_factory.mktemp("layout"))


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_module_imports_no_tooling(path: Path) -> None:
    bad = [n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the runtime must not depend on tooling"


def test_the_rule_catches_a_tooling_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.tooling.train import train\n    import exporters.package\n")
    assert {"pipeline.tooling.train", "exporters.package"} <= set(_imports(probe))


def test_serving_a_package_loads_no_tooling_and_no_torch(tiny_onnx_retail: Path) -> None:
    code = f"""
import json, sys
from pipeline.config import EngineConfig
from pipeline.engines import create_engine
from pipeline.package import load_package
from pipeline.predictor import Predictor
import pipeline.batch.stages, pipeline.stream.consumer  # the paths' own modules
pkg = load_package({str(tiny_onnx_retail)!r})
pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")))
out = pred.predict_batch([{{"id": "a", "workload": "retail", "text": "red shirt"}}]).json_lines()
assert len(out) == 1
print(json.dumps(sorted(sys.modules)))
"""
    got = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    mods = json.loads(got.stdout.strip().splitlines()[-1])
    loaded = [m for m in mods if m == "torch" or any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not loaded, f"the runtime loaded {loaded}"
