"""Trained model directory -> model package.

The package is assembled in a temporary sibling directory and renamed into
place, so a reader never sees a half-written package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import PackageError
from pipeline.package import Manifest, ModelPackage, Signature, Variant, load_package, publish, write_manifest
from pipeline.spec import WorkloadSpec
from pipeline.tooling.model.config import FusionConfig, signature

TORCH_FILES = ("model/config.json", "model/model.safetensors")


def build_package(
    trained_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    overwrite: bool = False,
) -> ModelPackage:
    """Create a verified model package from a trained model directory."""
    src = Path(trained_dir)
    for rel in (*TORCH_FILES, "workload.json"):
        if not (src / rel).is_file():
            raise PackageError(f"{src} is not a trained model directory: {rel} is missing (run `mmpipe train`)")
    spec = WorkloadSpec.model_validate_json((src / "workload.json").read_text())
    cfg = FusionConfig.model_validate_json((src / "model" / "config.json").read_text())
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PackageError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = list(TORCH_FILES)
        shutil.copytree(src / "model", tmp / "model")
        if spec.preprocessing.text is not None:
            if not (src / "tokenizer" / "tokenizer.json").is_file():
                raise PackageError(f"{src} has text preprocessing but no tokenizer/tokenizer.json")
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
            files.append("tokenizer/tokenizer.json")
        training = json.loads((src / "training.json").read_text()) if (src / "training.json").is_file() else {}
        manifest = Manifest(
            name=name or f"{spec.name}-fusion",
            version=version,
            workload=spec,
            signature=Signature.model_validate(signature(cfg)),
            variants={"torch": Variant(engine="torch", files=list(TORCH_FILES))},
            files={rel: "" for rel in files},
            training=training,
        )
        write_manifest(tmp, manifest)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_package(out)
