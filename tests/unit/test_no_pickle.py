"""No pickle loads anywhere in mmpipe's own code (weights are safetensors or
ONNX; torch.load only with weights_only=True)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("pipeline", "exporters", "deploy", "bench") for p in (ROOT / d).rglob("*.py")]
BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if fn.endswith("torch.load") and kwargs.get("weights_only") != "True":
                found.append("torch.load without weights_only=True")
            if fn.endswith(("np.load", "numpy.load")) and kwargs.get("allow_pickle", "False") != "False":
                found.append("np.load with allow_pickle")
    return [f"{path.relative_to(root)}: {v}" for v in found]


def test_sources_found() -> None:
    assert len(SOURCES) > 20


def test_no_pickle_loads() -> None:
    problems = [v for p in SOURCES for v in _violations(p)]
    assert not problems, "\n".join(problems)


def test_scanner_catches_a_pickle_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\ntorch.load('x.pt')\nimport numpy as np\nnp.load('a', allow_pickle=True)\n"
    )
    assert len(_violations(bad, tmp_path)) == 3
