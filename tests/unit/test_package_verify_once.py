"""A package is hashed once per process; workers of a run trust the driver's digest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import package as package_mod
from pipeline.errors import PackageError


@pytest.fixture
def pkg_copy(tiny_packages: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_packages["retail"], dst)
    return dst


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files sha256_file reads."""
    seen: list[str] = []
    real = package_mod.sha256_file

    def counting(path: Path) -> str:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(package_mod, "sha256_file", counting)
    return seen


def test_second_load_hashes_only_the_manifest(pkg_copy: Path, hashed: list[str]) -> None:
    first = package_mod.load_package(pkg_copy)
    n_files = len(first.manifest.files)
    assert len(hashed) == n_files + 1  # every file, plus the manifest's own digest
    hashed.clear()
    second = package_mod.load_package(pkg_copy)
    assert hashed == ["manifest.json"]
    assert second.digest == first.digest


def test_a_file_changed_after_loading_is_still_refused(pkg_copy: Path) -> None:
    pkg = package_mod.load_package(pkg_copy)
    weights = pkg_copy / next(r for r in pkg.manifest.files if r.endswith(".safetensors"))
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with pytest.raises(PackageError, match="checksum mismatch"):
        package_mod.load_package(pkg_copy)


def test_trusted_digest_skips_file_hashing(pkg_copy: Path, hashed: list[str]) -> None:
    digest = package_mod.load_package(pkg_copy).digest
    hashed.clear()
    package_mod.load_package(pkg_copy, trusted_digest=digest)
    assert hashed == ["manifest.json"]


def test_trusted_digest_refuses_another_manifest(pkg_copy: Path) -> None:
    digest = package_mod.load_package(pkg_copy).digest
    manifest = pkg_copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": ', '"version":  ', 1))
    with pytest.raises(PackageError, match="manifest digest"):
        package_mod.load_package(pkg_copy, trusted_digest=digest)
