"""Offline Kubernetes tooling for the chart tests: the real ``helm`` and the
operators' CRDs, both fetched once and cached outside the clone.

* ``helm``: built from source with ``go install helm.sh/helm/v3/cmd/helm@HELM_VERSION``
  (the Go module proxy is reachable where GitHub releases are not) into
  ``~/.cache/mmpipe/bin``; a ``helm`` on PATH is used when it exists.
* CRDs: the operators publish them inside their Go modules, so
  ``go mod download -json MODULE@VERSION`` yields the exact YAML the
  operator installs; each CRD's ``openAPIV3Schema`` validates our custom
  resources with ``jsonschema`` (what the API server would check).

``.ci/bootstrap.sh test`` runs the same steps ahead of time; these functions
are the fallback, so a test never depends on the order things were set up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

CACHE = Path(os.environ.get("MMPIPE_CACHE", Path.home() / ".cache" / "mmpipe"))
BIN = CACHE / "bin"
GOMODCACHE = CACHE / "gomod"

HELM_VERSION = "v3.16.4"
KUBE_VERSION = "1.30.0"
"""Kubernetes version the chart is rendered for and validated against."""

# module@version -> CRD files inside the module
CRD_MODULES: dict[str, list[str]] = {
    "github.com/ray-project/kuberay/ray-operator@v1.2.2": [
        "config/crd/bases/ray.io_rayservices.yaml",
        "config/crd/bases/ray.io_rayjobs.yaml",
        "config/crd/bases/ray.io_rayclusters.yaml",
    ],
    "github.com/prometheus-operator/prometheus-operator@v0.79.2": [
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
        "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml",
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
    ],
    "github.com/kedacore/keda/v2@v2.16.1": [
        "config/crd/bases/keda.sh_scaledobjects.yaml",
        "config/crd/bases/keda.sh_triggerauthentications.yaml",
    ],
}


class ToolUnavailable(Exception):
    """A tool could not be found or fetched; the message says what was tried."""


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOBIN=str(BIN), GOMODCACHE=str(GOMODCACHE), GOFLAGS="-mod=mod", GOTOOLCHAIN="local")
    return env


def helm_binary() -> str:
    """Path of a ``helm`` v3, building the pinned version with Go if needed."""
    cached = BIN / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    found = shutil.which("helm")
    if found:
        return found
    go = shutil.which("go")
    if not go:
        raise ToolUnavailable("helm is not installed and Go is not available to build it "
                              f"(go install helm.sh/helm/v3/cmd/helm@{HELM_VERSION})")
    BIN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([go, "install", f"helm.sh/helm/v3/cmd/helm@{HELM_VERSION}"], cwd=tmp,
                             env=_go_env(), capture_output=True, text=True, timeout=1800, check=False)
    if res.returncode != 0 or not cached.is_file():
        raise ToolUnavailable(f"go install helm@{HELM_VERSION} failed: {(res.stdout + res.stderr)[-800:]}")
    return str(cached)


def module_dir(module: str) -> Path:
    """Local directory of a Go module version (downloaded through the proxy once)."""
    go = shutil.which("go")
    if not go:
        raise ToolUnavailable(f"Go is not available to download {module}")
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([go, "mod", "download", "-json", module], cwd=tmp, env=_go_env(),
                             capture_output=True, text=True, timeout=900, check=False)
    try:
        info = json.loads(res.stdout)
    except json.JSONDecodeError:
        info = {}
    if res.returncode != 0 or "Dir" not in info:
        raise ToolUnavailable(f"go mod download {module} failed: {(res.stdout + res.stderr)[-800:]}")
    return Path(info["Dir"])


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> openAPIV3Schema`` for every served version of the CRDs above."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for module, files in CRD_MODULES.items():
        root = module_dir(module)
        for rel in files:
            crd = yaml.safe_load((root / rel).read_text())
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out
