"""Model packages: round trip, checksums, tamper and incompleteness refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import PackageError
from pipeline.package import load_package, read_manifest


@pytest.fixture
def pkg(tiny_packages: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(tiny_packages["retail"], dst)
    return dst


def test_round_trip(pkg: Path) -> None:
    p = load_package(pkg)
    m = p.manifest
    assert m.workload.name == "retail"
    assert set(m.files) == {"model/config.json", "model/model.safetensors", "tokenizer/tokenizer.json"}
    assert all(len(d) == 64 for d in m.files.values())
    assert [i.name for i in m.signature.inputs] == [
        "input_ids", "attention_mask", "pixel_values", "tabular", "presence"
    ]
    assert [o.name for o in m.signature.outputs] == ["category", "attributes"]
    assert m.variants["torch"].files == ["model/config.json", "model/model.safetensors"]
    assert "f1" in m.training
    assert p.text_encoder() is not None


def test_tampered_weights_refused(pkg: Path) -> None:
    w = pkg / "model" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"checksum mismatch for model/model.safetensors"):
        load_package(pkg)


def test_missing_file_refused(pkg: Path) -> None:
    (pkg / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(PackageError, match=r"missing file tokenizer/tokenizer\.json"):
        load_package(pkg)


def test_missing_or_broken_manifest(pkg: Path, tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="not a model package"):
        load_package(tmp_path)
    with pytest.raises(PackageError, match="not found"):
        load_package(tmp_path / "nope")
    (pkg / "manifest.json").write_text("{")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package(pkg)


def test_manifest_edits_are_checked(pkg: Path) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = "0" * 64
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="outside the package"):
        load_package(pkg)


def test_variant_without_checksum_refused(pkg: Path) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    m["variants"]["torch"]["files"].append("model/extra.bin")
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="has no checksum"):
        load_package(pkg)


def test_newer_format_refused(pkg: Path) -> None:
    m = json.loads((pkg / "manifest.json").read_text())
    m["format_version"] = 99
    (pkg / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="newer"):
        read_manifest(pkg)


def test_no_pickle_in_package(pkg: Path) -> None:
    for f in pkg.rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:2]
            assert head != b"\x80\x04" and head != b"\x80\x02", f"{f} looks like a pickle"
