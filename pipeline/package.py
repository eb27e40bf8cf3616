"""Model packages: the only artifact that moves from export to serving.

A package is a directory::

    manifest.json              name, version, workload spec, signature,
                               variants, sha256 of every file, parity report
    model/config.json          fusion model config (PyTorch reference)
    model/model.safetensors    weights (no pickle anywhere)
    tokenizer/tokenizer.json   fast tokenizer, loaded without transformers
    (ONNX variants are added by the exporters)

Loading verifies every checksum and refuses a package with a missing,
altered or unlisted-but-referenced file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import __version__
from pipeline.errors import PackageError
from pipeline.spec import WorkloadSpec
from pipeline.tokenizer import TextEncoder

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
"""1: mmpipe's own fusion family.  2: adds ``source`` and the signature's
``feature``/``head`` mapping (models brought from elsewhere); format 1
manifests load unchanged."""
_CHUNK = 1 << 20


# What the Preprocessor computes, by feature; the inputs of mmpipe's own
# fusion family carry these names, so their manifests need no ``feature``.
FEATURES: dict[str, str] = {
    "text.input_ids": "input_ids",
    "text.attention_mask": "attention_mask",
    "text.token_type_ids": "token_type_ids",
    "image.pixel_values": "pixel_values",
    "audio.log_mel": "audio_features",
    "tabular.values": "tabular",
    "presence": "presence",
}
_FEATURE_OF_NAME = {v: k for k, v in FEATURES.items()}


class TensorSpec(BaseModel):
    """One input or output of the model graph.

    ``feature`` (inputs) says which Preprocessor feature feeds the input and
    ``head`` (outputs) which workload head reads the output, so a model
    brought from elsewhere keeps its own tensor names.  Both default to
    mmpipe's own names (format 1 manifests have neither)."""

    model_config = ConfigDict(extra="allow")
    name: str
    dtype: str
    shape: list[int | str]
    feature: str | None = None
    head: str | None = None

    def feature_name(self) -> str | None:
        """The Preprocessor feature this input takes (None: unknown)."""
        return self.feature or _FEATURE_OF_NAME.get(self.name)


class Signature(BaseModel):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def head_outputs(self) -> dict[str, str]:
        """Head name -> graph output name."""
        return {o.head or o.name: o.name for o in self.outputs}

    @property
    def needs_fixed_length(self) -> bool:
        """See :func:`fixed_length_inputs`."""
        return fixed_length_inputs(self.inputs)


def fixed_length_inputs(inputs: Iterable[TensorSpec]) -> bool:
    """A text model without an attention-mask input: padding reaches its
    results, so every batch must be padded to the text max_length for a
    record's answer not to depend on its neighbours."""
    feats = {i.feature_name() for i in inputs}
    return "text.input_ids" in feats and "text.attention_mask" not in feats


class Variant(BaseModel):
    """One runnable form of the model (``torch``, ``onnx-fp32``, ...)."""

    model_config = ConfigDict(extra="allow")
    engine: str
    files: list[str]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    mmpipe_version: str = __version__
    workload: WorkloadSpec
    signature: Signature
    variants: dict[str, Variant]
    files: dict[str, str] = Field(description="relative path -> sha256")
    training: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] | None = None
    source: dict[str, Any] | None = Field(
        None, description="where a brought model came from (kind: module | hf | onnx, and its origin)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe_rel(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise PackageError(f"manifest lists a path outside the package: {rel!r}")
    return p


class ModelPackage:
    """A verified model package on disk."""

    def __init__(self, root: Path, manifest: Manifest, digest: str | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self._digest = digest

    @property
    def digest(self) -> str:
        """sha256 of ``manifest.json``: names this exact package (the
        manifest holds every other file's checksum)."""
        if self._digest is None:
            self._digest = sha256_file(self.root / MANIFEST)
        return self._digest

    @property
    def spec(self) -> WorkloadSpec:
        return self.manifest.workload

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def path(self, rel: str) -> Path:
        if rel not in self.manifest.files:
            raise PackageError(f"package {self.root} has no file {rel!r} in its manifest")
        return _safe_rel(self.root, rel)

    def variant(self, name: str) -> Variant:
        try:
            return self.manifest.variants[name]
        except KeyError:
            raise PackageError(
                f"package {self.name} has no variant {name!r}; it has {sorted(self.manifest.variants)}"
            ) from None

    def text_encoder(self) -> TextEncoder | None:
        prep = self.spec.preprocessing.text
        if prep is None:
            return None
        return TextEncoder.load(self.path("tokenizer/tokenizer.json").parent, prep.max_length)


def read_manifest(root: Path) -> Manifest:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise PackageError(f"{root} is not a model package: {MANIFEST} is missing")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"{mpath} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise PackageError(
            f"package format {data['format_version']} is newer than this mmpipe understands "
            f"({FORMAT_VERSION}); upgrade mmpipe"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise PackageError(f"{mpath} is not a valid manifest:\n{exc}") from None


def verify(root: Path, manifest: Manifest) -> None:
    """Every listed file exists and matches its sha256; every variant's files
    are listed.  Raises PackageError naming each problem."""
    problems: list[str] = []
    for rel, digest in sorted(manifest.files.items()):
        p = _safe_rel(root, rel)
        if not p.is_file():
            problems.append(f"missing file {rel}")
        elif sha256_file(p) != digest:
            problems.append(f"checksum mismatch for {rel} (file altered or corrupt)")
    for vname, var in manifest.variants.items():
        for rel in var.files:
            if rel not in manifest.files:
                problems.append(f"variant {vname} uses {rel}, which has no checksum")
    if problems:
        raise PackageError(f"model package {root} refused: " + "; ".join(problems))


_verified: dict[tuple[str, str], tuple[tuple[str, int, int], ...]] = {}
_verified_lock = threading.Lock()


def _stat_key(root: Path, manifest: Manifest) -> tuple[tuple[str, int, int], ...]:
    """Size and modification time of every listed file: what a rewrite changes."""
    out = []
    for rel in sorted(manifest.files):
        try:
            st = _safe_rel(root, rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((rel, -1, -1))
    return tuple(out)


def load_package(root: str | Path, *, trusted_digest: str | None = None) -> ModelPackage:
    """Read and verify a model package, hashing its files once per process.

    A package already verified by this process (same manifest digest, same
    file sizes and modification times) is not hashed again.  With
    ``trusted_digest`` (the digest of a package another process of the same
    run verified: the batch job's driver hands it to its workers) only the
    manifest is hashed, and a package whose manifest differs is refused."""
    r = Path(root)
    if not r.is_dir():
        raise PackageError(f"model package directory not found: {r}")
    manifest = read_manifest(r)
    digest = sha256_file(r / MANIFEST)
    if trusted_digest is not None:
        if digest != trusted_digest:
            raise PackageError(
                f"model package {r} refused: its manifest digest {digest[:12]} is not the {trusted_digest[:12]} "
                "this run verified (the package changed while the job ran)"
            )
        return ModelPackage(r, manifest, digest)
    key = (str(r.resolve()), digest)
    stats = _stat_key(r, manifest)
    with _verified_lock:
        known = _verified.get(key) == stats
    if not known:
        verify(r, manifest)
        with _verified_lock:
            _verified[key] = stats
    return ModelPackage(r, manifest, digest)


def load_package_copy(root: str | Path) -> ModelPackage:
    """A partial copy of a package (a Triton python model's ``package/``:
    the manifest and only the files that model needs).  Every file present
    is verified against the manifest's sha256; absent ones are allowed, and
    :meth:`ModelPackage.path` still names them, so a model needing a file
    its copy lacks fails when it opens it."""
    r = Path(root)
    manifest = read_manifest(r)
    for rel, digest in manifest.files.items():
        path = _safe_rel(r, rel)
        if path.is_file() and sha256_file(path) != digest:
            raise PackageError(f"checksum mismatch for {rel} in {r} (file altered or corrupt)")
    return ModelPackage(r, manifest)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Recompute every listed checksum and write the manifest atomically."""
    manifest.files = {rel: sha256_file(_safe_rel(root, rel)) for rel in sorted(manifest.files)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(root / MANIFEST)


def publish(tmp: Path, out: Path) -> None:
    """Move a fully written package directory into place.  Renames only, so a
    reader sees the old package or the new one, never a half-written one; the
    old one is removed after the swap."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
