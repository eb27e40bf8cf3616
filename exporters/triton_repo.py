"""Model package -> NVIDIA Triton model repository.

One package becomes up to six Triton models (``NAME`` is the package name
unless ``model_name`` says otherwise)::

    REPO/
      NAME/                  the ONNX model on Triton's onnxruntime backend (GPU
        config.pbtxt         fleets); dynamic batching, instance groups, an
        1/model.onnx         optional TensorRT accelerator, warmup
        warmup/              raw warmup tensors (attention mask and presence of ones)
      NAME_cpu/              the same model and signature on the python backend
        config.pbtxt         running onnxruntime in the stub: for Triton builds
        1/model.py           without the onnxruntime backend (the pytriton wheel,
        1/model.onnx         CPU-only nodes)
      NAME_preprocess/       python backend: raw record JSON bytes -> model inputs
        config.pbtxt         + VALID / ERROR / ERROR_MESSAGE (+ TOKEN_OFFSETS),
        1/model.py           with the package's own Preprocessor, so a bad
        1/package/           record gets a reason code and its neighbours answer
      NAME_ensemble/         RECORD -> NAME_preprocess -> NAME
      NAME_ensemble_cpu/     RECORD -> NAME_preprocess -> NAME_cpu
      NAME_generate/         decoupled python model (packages with an exported
        config.pbtxt         generative head): raw records in, one response
        1/model.py           per generated token out, with the package's own
        1/package/           pipeline.generate.Generator

Choices worth knowing (see also deploy/triton/README.md):

* **Fixed text length inside the ensemble.**  The preprocess model pads text
  to the package's ``max_length``, so every request reaching the model from
  the ensemble has the same shape and Triton's dynamic batcher can merge
  them (it only merges equal shapes).  The model is padding-invariant (the
  attention mask hides pads), so scores equal the Predictor's, which pads to
  the longest record of its batch.  Direct clients of ``NAME`` may send any
  sequence length.
* **The python-backend models import ``pipeline``** from the directory named
  by the ``MMPIPE_PYTHONPATH`` config parameter (default: the source root of
  the ``pipeline`` that built the repository; empty: rely on the stub's
  Python environment, e.g. mmpipe installed in the serving image).
* **Configs are written as text** by a small writer here (no tritonclient
  needed to build a repository); the unit tests parse every one of them with
  the ``ModelConfig`` protobuf that tritonclient ships.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import PackageError
from pipeline.oip import (  # the runtime's names, one home
    GENERATE_INPUTS,
    GENERATE_OUTPUTS,
    GENERATE_SUFFIX,
    PREPROCESS_OUTPUTS,
    RECORD,
    TOKEN_OFFSETS,
)

if TYPE_CHECKING:
    from pipeline.config import GenerateConfig, Limits
    from pipeline.package import ModelPackage

# numpy and pipeline.package are imported where used: `mmpipe --help` builds
# this module's parser and should stay quick.

InstanceKind = Literal["auto", "gpu", "cpu"]

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "triton"
"""Python-backend model sources, copied into each repository."""


_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
    "string": "TYPE_STRING",
}
_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
_TRT_PRECISIONS = ("FP32", "FP16", "INT8")


class TritonRepoError(ValueError):
    """The repository cannot be built from these options or this package."""


# -- a small protobuf text-format writer ----------------------------------------------------
class Enum(str):
    """A protobuf enum value: written bare (``KIND_GPU``), not quoted."""


def _quote(s: str) -> str:
    out = []
    for ch in s.encode("utf-8"):
        c = chr(ch)
        if c in ('"', "\\"):
            out.append("\\" + c)
        elif 32 <= ch < 127:
            out.append(c)
        else:
            out.append(f"\\{ch:03o}")
    return '"' + "".join(out) + '"'


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _quote(v)
    raise TypeError(f"cannot write {type(v).__name__} in a model config")


def to_pbtxt(msg: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format for a message given as a dict: nested dicts are
    messages, lists of dicts repeated messages (map fields too, as
    ``{"key": ..., "value": ...}`` entries), lists of scalars repeated
    scalars.  ``None`` values are left out."""
    pad = "  " * indent
    lines: list[str] = []
    for key, val in msg.items():
        if val is None:
            continue
        if isinstance(val, dict):
            lines.append(f"{pad}{key} {{")
            lines.append(to_pbtxt(val, indent + 1))
            lines.append(f"{pad}}}")
        elif isinstance(val, list) and val and all(isinstance(v, dict) for v in val):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(val):
                lines.append(f"{pad}  {{")
                lines.append(to_pbtxt(item, indent + 2))
                lines.append(f"{pad}  }}" + ("," if i < len(val) - 1 else ""))
            lines.append(f"{pad}]")
        elif isinstance(val, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in val)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(val)}")
    return "\n".join(line for line in lines if line)


# -- pieces of a model config -------------------------------------------------------------
def _dims(shape: Sequence[int | str], seq_len: int | None = None) -> list[int]:
    """Signature shape without the batch axis; ``sequence`` becomes -1 (or
    ``seq_len`` where the text length is fixed)."""
    out = []
    for d in list(shape)[1:]:
        if isinstance(d, int):
            out.append(d)
        elif d == "sequence" and seq_len is not None:
            out.append(seq_len)
        else:
            out.append(-1)
    return out


def _tensor(name: str, dtype: str, dims: list[int]) -> dict[str, Any]:
    if dtype not in _DTYPES:
        raise TritonRepoError(f"tensor {name!r} has dtype {dtype!r}, which Triton configs here do not map")
    return {"name": name, "data_type": Enum(_DTYPES[dtype]), "dims": dims}


def _version_policy(policy: str, model_version: int) -> dict[str, Any]:
    """``latest:N`` | ``all`` | ``specific:1,2``."""
    p = policy.strip()
    if p == "all":
        return {"all": {}}
    m = re.fullmatch(r"latest:(\d+)", p)
    if m and int(m.group(1)) >= 1:
        return {"latest": {"num_versions": int(m.group(1))}}
    m = re.fullmatch(r"specific:(\d+(?:,\d+)*)", p)
    if m:
        versions = [int(v) for v in m.group(1).split(",")]
        if model_version not in versions:
            raise TritonRepoError(
                f"version_policy {policy!r} does not serve the version this repository writes ({model_version})"
            )
        return {"specific": {"versions": versions}}
    raise TritonRepoError(f"version_policy {policy!r}: use 'latest:N', 'all' or 'specific:V1,V2'")


def _param(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"string_value": value}}


def _warmup_files(pkg: ModelPackage, seq_len: int | None) -> dict[str, bytes]:
    """Raw warmup tensors (one batch row) that zero/random data cannot give
    validly: an attention mask and a presence mask of ones (all-zero masks
    would warm up a degenerate path)."""
    import numpy as np

    files: dict[str, bytes] = {}
    for t in pkg.manifest.signature.inputs:
        if t.name in ("attention_mask", "presence"):
            dims = [d if d > 0 else (seq_len or 1) for d in _dims(t.shape, seq_len)]
            files[f"{t.name}_ones"] = np.ones(dims, dtype=np.dtype(t.dtype)).tobytes()
    return files


def _warmup(pkg: ModelPackage, seq_len: int | None) -> list[dict[str, Any]]:
    """One batch-1 warmup request: ids zero, masks from files of ones, float
    features random."""
    inputs = []
    for t in pkg.manifest.signature.inputs:
        dims = [d if d > 0 else (seq_len or 1) for d in _dims(t.shape, seq_len)]
        spec: dict[str, Any] = {"data_type": Enum(_DTYPES[t.dtype]), "dims": dims}
        if t.name in ("attention_mask", "presence"):
            spec["input_data_file"] = f"{t.name}_ones"
        elif t.dtype.startswith("float"):
            spec["random_data"] = True
        else:
            spec["zero_data"] = True
        inputs.append({"key": t.name, "value": spec})
    return [{"name": "batch1", "batch_size": 1, "inputs": inputs}]


def _dynamic_batching(preferred: Sequence[int], delay_us: int) -> dict[str, Any]:
    return {"preferred_batch_size": list(preferred) or None, "max_queue_delay_microseconds": delay_us}


def _trt_accelerator(pkg: ModelPackage, precision: str, max_batch_size: int, seq_len: int | None,
                     cache_dir: str | None) -> dict[str, Any]:
    """onnxruntime backend's TensorRT execution accelerator, with optimization
    profiles over the dynamic batch and sequence axes (so engines are built
    once for the whole range rather than per new shape)."""
    params = [("precision_mode", precision), ("max_workspace_size_bytes", str(1 << 30))]
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for t in pkg.manifest.signature.inputs:
        for key, batch, seq in (("min", 1, 1), ("opt", max(1, max_batch_size // 4), max(1, (seq_len or 1) // 2)),
                                ("max", max_batch_size, seq_len or 1)):
            dims = [batch if d == "batch" else seq if d == "sequence" else int(d) for d in t.shape]
            shapes[key].append(f"{t.name}:{'x'.join(str(d) for d in dims)}")
    params += [(f"trt_profile_{k}_shapes", ",".join(v)) for k, v in shapes.items()]
    if cache_dir:
        params += [("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", cache_dir),
                   ("trt_timing_cache_enable", "1"), ("trt_timing_cache_path", cache_dir)]
    return {"execution_accelerators": {"gpu_execution_accelerator": [
        {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in params]}
    ]}}


# -- the repository -------------------------------------------------------------------------------
def _check_onnx(path: Path, pkg: ModelPackage) -> None:
    """The ONNX graph's inputs and outputs are the package signature's (names
    only; dtypes and ranks are the exporter's parity check's business).
    Skipped where the ``onnx`` library is not installed."""
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is in every build environment we use
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    have_in = [i.name for i in graph.input if i.name not in init]
    have_out = [o.name for o in graph.output]
    want_in = [t.name for t in pkg.manifest.signature.inputs]
    want_out = [t.name for t in pkg.manifest.signature.outputs]
    if sorted(have_in) != sorted(want_in) or sorted(have_out) != sorted(want_out):
        raise TritonRepoError(
            f"{path.name} does not match the package signature: graph inputs {have_in} outputs {have_out}, "
            f"signature inputs {want_in} outputs {want_out}"
        )


def _generate_variants(pkg: ModelPackage, config: GenerateConfig) -> list[str]:
    """The ``generate-*`` variants ``NAME_generate`` may load with this
    config (``auto`` picks fp16 on GPU instances, fp32 elsewhere: both are
    copied where the package has them)."""
    from pipeline.generate import generation_variant

    wanted = ("fp32", "fp16") if config.variant == "auto" else (config.variant,)
    out = []
    for v in wanted:
        if v == "fp16" and config.variant == "auto" and f"generate-{v}" not in pkg.manifest.variants:
            continue
        try:
            generation_variant(pkg, v)
        except PackageError as exc:
            raise TritonRepoError(f"NAME_generate: {exc}") from None
        out.append(f"generate-{v}")
    return out


def _generate_model(name: str, kind: InstanceKind, count: int, params: list[dict[str, Any]]) -> dict[str, Any]:
    """``NAME_generate``'s config: the tensors of ``pipeline.oip``'s
    generation contract (no batch axis: one request carries its records as
    ``RECORD [n]`` and gets one ``[1]``-tensor response per token event),
    decoupled so a request can get many responses."""
    def dtype(datatype: str) -> str:
        return "string" if datatype == "BYTES" else datatype.lower()

    inputs = []
    for iname, datatype, shape, optional in GENERATE_INPUTS:
        t = _tensor(iname, dtype(datatype), list(shape))
        inputs.append({**t, "optional": True} if optional else t)
    return {
        "name": f"{name}{GENERATE_SUFFIX}", "backend": "python", "max_batch_size": 0,
        "input": inputs, "output": [_tensor(oname, dtype(datatype), [1]) for oname, datatype in GENERATE_OUTPUTS],
        "model_transaction_policy": {"decoupled": True},
        "instance_group": [{"name": f"{name}{GENERATE_SUFFIX}", "kind": Enum(_KINDS[kind]), "count": count}],
        "parameters": params,
    }


def _default_pythonpath() -> str:
    import pipeline

    return str(Path(pipeline.__file__).resolve().parents[1])


def build_triton_repo(
    package_dir: str | Path,
    out_dir: str | Path,
    *,
    variant: str = "onnx-fp32",
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 2000,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
    tensorrt: bool = False,
    tensorrt_precision: str = "FP16",
    tensorrt_cache_dir: str | None = None,
    warmup: bool = True,
    version_policy: str = "latest:1",
    cpu_python_backend: bool = True,
    model_name: str | None = None,
    model_version: int = 1,
    preprocess_instance_count: int = 2,
    cpu_instance_count: int = 1,
    pythonpath: str | None = None,
    generate: bool | None = None,
    generate_config: GenerateConfig | None = None,
    limits: Limits | None = None,
    generate_instance_count: int = 1,
) -> Path:
    """Write (or replace) one package's models in a Triton model repository.

    ``out_dir`` is the repository root; other models in it are left alone, so
    several packages can share one repository.  The package is verified
    first (checksums) and the copied ONNX file is checked against the
    manifest again after copying.  Returns the repository root.

    ``instance_kind`` ``auto`` writes ``KIND_AUTO``: Triton places the
    instances on GPUs when it has any and on the CPU otherwise.
    ``tensorrt`` adds the onnxruntime backend's TensorRT accelerator (GPU
    instances only).  ``cpu_python_backend`` adds ``NAME_cpu`` and
    ``NAME_ensemble_cpu``, which run anywhere the python backend does.

    ``generate`` adds ``NAME_generate`` (None: when the package carries an
    exported generative head); ``generate_config`` (the ``generate``
    settings section) and ``limits`` are written into its parameters, and
    its instances are placed by ``instance_kind``.
    """
    from pipeline.config import GenerateConfig
    from pipeline.package import load_package, sha256_file

    pkg = load_package(package_dir)
    name = model_name or pkg.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,100}", name):
        raise TritonRepoError(f"model name {name!r} is not a valid Triton model directory name")
    var = pkg.variant(variant)
    if var.engine != "onnxruntime" or not var.files or not var.files[0].endswith(".onnx"):
        raise TritonRepoError(
            f"variant {variant!r} of package {pkg.name} is not an ONNX variant (engine {var.engine!r}); "
            f"export one first (mmpipe export) — present: {sorted(pkg.manifest.variants)}"
        )
    if max_batch_size < 1:
        raise TritonRepoError("max_batch_size must be >= 1 (the ensemble batches records)")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if bad:
        raise TritonRepoError(f"preferred batch sizes {bad} are outside 1..max_batch_size={max_batch_size}")
    if max_queue_delay_us < 0:
        raise TritonRepoError("max_queue_delay_us must be >= 0")
    if instance_kind not in _KINDS:
        raise TritonRepoError(f"instance_kind {instance_kind!r}: use one of {sorted(_KINDS)}")
    if min(instance_count, preprocess_instance_count, cpu_instance_count, generate_instance_count) < 1:
        raise TritonRepoError("instance counts must be >= 1")
    if tensorrt and instance_kind == "cpu":
        raise TritonRepoError("tensorrt needs GPU instances; use instance_kind 'gpu' or 'auto'")
    if tensorrt_precision not in _TRT_PRECISIONS:
        raise TritonRepoError(f"tensorrt_precision {tensorrt_precision!r}: use one of {_TRT_PRECISIONS}")
    if model_version < 1:
        raise TritonRepoError("model_version must be >= 1")
    policy = _version_policy(version_policy, model_version)
    has_head = any(v.startswith("generate-") for v in pkg.manifest.variants)
    if generate and not has_head:
        raise TritonRepoError(f"package {pkg.name} has no exported generative head, so it cannot have "
                              f"{name}{GENERATE_SUFFIX} (train with --generative, then mmpipe export)")
    generate = has_head if generate is None else generate
    gen_cfg = generate_config or GenerateConfig()
    gen_variants = _generate_variants(pkg, gen_cfg) if generate else []
    for src in ("preprocess/model.py", "onnxruntime_cpu/model.py", "generate/model.py"):
        if not (DEPLOY_DIR / src).is_file():
            raise TritonRepoError(f"python-backend model source {DEPLOY_DIR / src} is missing (mmpipe checkout?)")

    text = pkg.spec.preprocessing.text
    seq_len = text.max_length if text else None
    sig = pkg.manifest.signature
    inputs = [_tensor(t.name, t.dtype, _dims(t.shape)) for t in sig.inputs]
    outputs = [_tensor(t.name, t.dtype, _dims(t.shape)) for t in sig.outputs]
    batching = _dynamic_batching(preferred_batch_sizes, max_queue_delay_us)
    warm = _warmup(pkg, seq_len) if warmup else None
    warm_files = _warmup_files(pkg, seq_len) if warmup else {}
    pad_id = pkg.text_encoder().pad_id if text else 0
    pypath = _default_pythonpath() if pythonpath is None else pythonpath
    onnx_src = pkg.path(var.files[0])
    onnx_digest = pkg.manifest.files[var.files[0]]

    models: dict[str, dict[str, Any]] = {}
    models[name] = {
        "name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
        "max_batch_size": max_batch_size, "version_policy": policy,
        "input": inputs, "output": outputs, "dynamic_batching": batching,
        "instance_group": [{"name": f"{name}_{instance_kind}", "kind": Enum(_KINDS[instance_kind]),
                            "count": instance_count}],
        "optimization": (_trt_accelerator(pkg, tensorrt_precision, max_batch_size, seq_len, tensorrt_cache_dir)
                         if tensorrt else None),
        "model_warmup": warm,
    }
    if cpu_python_backend:
        # Triton's dynamic batcher only merges requests of equal shapes; the
        # python model pads text itself, so it may take ragged lengths.
        cpu_inputs = [{**t, "allow_ragged_batch": True} if -1 in t["dims"] else t for t in inputs]
        models[f"{name}_cpu"] = {
            "name": f"{name}_cpu", "backend": "python", "max_batch_size": max_batch_size,
            "version_policy": policy, "input": cpu_inputs, "output": outputs, "dynamic_batching": batching,
            "instance_group": [{"name": f"{name}_cpu", "kind": Enum("KIND_CPU"), "count": cpu_instance_count}],
            "parameters": [_param("MODEL_FILE", "model.onnx"), _param("PAD_ID", str(pad_id)),
                           _param("ORT_INTRA_OP_THREADS", "0"), _param("MMPIPE_PYTHONPATH", pypath)],
            "model_warmup": warm,
        }
    pre_outputs = [_tensor(t.name, t.dtype, _dims(t.shape, seq_len)) for t in sig.inputs]
    pre_outputs += [_tensor("VALID", "bool", [1]), _tensor("ERROR", "string", [1]),
                    _tensor("ERROR_MESSAGE", "string", [1])]
    if seq_len is not None and any(h.type == "token" for h in pkg.spec.heads):
        pre_outputs.append(_tensor(TOKEN_OFFSETS, "int64", [seq_len, 2]))
    models[f"{name}_preprocess"] = {
        "name": f"{name}_preprocess", "backend": "python", "max_batch_size": max_batch_size,
        "input": [_tensor(RECORD, "string", [1])], "output": pre_outputs,
        "instance_group": [{"name": f"{name}_preprocess", "kind": Enum("KIND_CPU"),
                            "count": preprocess_instance_count}],
        "parameters": [_param("MMPIPE_PYTHONPATH", pypath), _param("PACKAGE_DIR", "package"),
                       _param("ALLOWED_URI_SCHEMES", "")],
    }
    if generate:
        models[f"{name}{GENERATE_SUFFIX}"] = _generate_model(name, instance_kind, generate_instance_count, [
            _param("MMPIPE_PYTHONPATH", pypath), _param("PACKAGE_DIR", "package"), _param("ALLOWED_URI_SCHEMES", ""),
            _param("GENERATE", gen_cfg.model_dump_json(exclude_unset=True)),
            _param("LIMITS", limits.model_dump_json(exclude_unset=True) if limits is not None else ""),
            _param("ORT_INTRA_OP_THREADS", "0"),
        ])
    extra_out = [t for t in pre_outputs if t["name"] in (*PREPROCESS_OUTPUTS, TOKEN_OFFSETS)]
    for ens, target in ((f"{name}_ensemble", name), (f"{name}_ensemble_cpu", f"{name}_cpu")):
        if target not in models:
            continue
        models[ens] = {
            "name": ens, "platform": "ensemble", "max_batch_size": max_batch_size,
            "input": [_tensor(RECORD, "string", [1])], "output": outputs + extra_out,
            "ensemble_scheduling": {"step": [
                {"model_name": f"{name}_preprocess", "model_version": -1,
                 "input_map": [{"key": RECORD, "value": RECORD}],
                 "output_map": [{"key": t["name"], "value": t["name"]} for t in pre_outputs]},
                {"model_name": target, "model_version": -1,
                 "input_map": [{"key": t.name, "value": t.name} for t in sig.inputs],
                 "output_map": [{"key": t.name, "value": t.name} for t in sig.outputs]},
            ]},
        }

    repo = Path(out_dir)
    repo.mkdir(parents=True, exist_ok=True)
    # Staged beside the repository, not in it: a server polling the
    # repository must never see a half-written model directory.
    stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.{name}.", dir=repo.resolve().parent))
    try:
        vdir = str(model_version)
        for mname, cfg in models.items():
            mdir = stage / mname
            (mdir / vdir).mkdir(parents=True)
            (mdir / "config.pbtxt").write_text(
                f"# written by mmpipe triton-repo from package {pkg.name} v{pkg.version} ({variant})\n"
                + to_pbtxt(cfg) + "\n"
            )
            if cfg.get("model_warmup"):
                (mdir / "warmup").mkdir()
                for fname, data in warm_files.items():
                    (mdir / "warmup" / fname).write_bytes(data)
        for target in (name, f"{name}_cpu"):
            if target in models:
                dst = stage / target / vdir / "model.onnx"
                shutil.copyfile(onnx_src, dst)
                if sha256_file(dst) != onnx_digest:
                    raise PackageError(f"{var.files[0]} changed while it was copied; rebuild the repository")
                _check_onnx(dst, pkg)
        if f"{name}_cpu" in models:
            shutil.copyfile(DEPLOY_DIR / "onnxruntime_cpu" / "model.py", stage / f"{name}_cpu" / vdir / "model.py")
        pre = stage / f"{name}_preprocess" / vdir
        shutil.copyfile(DEPLOY_DIR / "preprocess" / "model.py", pre / "model.py")
        text_files = ["tokenizer/tokenizer.json"] if text is not None else []
        _copy_package_files(pkg, pre / "package", text_files)
        if generate:
            gen = stage / f"{name}{GENERATE_SUFFIX}" / vdir
            shutil.copyfile(DEPLOY_DIR / "generate" / "model.py", gen / "model.py")
            _copy_package_files(pkg, gen / "package",
                                text_files + [f for v in gen_variants for f in pkg.variant(v).files])
        # Swap each model directory into place; a stale sibling from an
        # earlier build with other options (e.g. no CPU models) goes too.
        for mname in (name, f"{name}_cpu", f"{name}_preprocess", f"{name}_ensemble", f"{name}_ensemble_cpu",
                      f"{name}{GENERATE_SUFFIX}"):
            dst = repo / mname
            if dst.exists():
                shutil.move(dst, stage / f".old-{mname}")
            if mname in models:
                shutil.move(stage / mname, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return repo


def _copy_package_files(pkg: ModelPackage, dst: Path, files: list[str]) -> None:
    """A partial package copy for a python model: the manifest and
    ``files``, each checked against the manifest after copying (the model
    verifies them again when it loads)."""
    from pipeline.package import MANIFEST, sha256_file

    dst.mkdir()
    shutil.copyfile(pkg.root / MANIFEST, dst / MANIFEST)
    for rel in dict.fromkeys(files):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pkg.path(rel), dst / rel)
        if sha256_file(dst / rel) != pkg.manifest.files[rel]:
            raise PackageError(f"{rel} changed while it was copied; rebuild the repository")


def repository_models(name: str, *, cpu_python_backend: bool = True, generate: bool = False) -> dict[str, list[str]]:
    """Which models to load where: ``gpu`` servers (onnxruntime backend) and
    ``cpu`` servers (python backend only); ``NAME_generate`` (python
    backend) on both when the repository has it."""
    gen = [f"{name}{GENERATE_SUFFIX}"] if generate else []
    out = {"gpu": [f"{name}_preprocess", name, f"{name}_ensemble", *gen]}
    if cpu_python_backend:
        out["cpu"] = [f"{name}_preprocess", f"{name}_cpu", f"{name}_ensemble_cpu", *gen]
    return out


# -- CLI -----------------------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mmpipe triton-repo``: wired into pipeline.tooling.cli with one line."""
    p = sub.add_parser(
        "triton-repo", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a Triton model repository (ONNX model, preprocess, ensemble) from a package",
        description="Write NVIDIA Triton models for a package into a model repository:\n"
        "  NAME               the ONNX model on the onnxruntime backend (GPU fleets)\n"
        "  NAME_preprocess    raw record JSON -> model inputs + VALID/ERROR (python backend)\n"
        "  NAME_ensemble      RECORD bytes -> preprocess -> NAME (clients send raw records)\n"
        "  NAME_cpu           the same model on the python backend with onnxruntime (CPU servers)\n"
        "  NAME_ensemble_cpu  RECORD bytes -> preprocess -> NAME_cpu\n"
        "  NAME_generate      RECORD bytes -> streamed tokens (decoupled python model; packages\n"
        "                     with an exported generative head)\n"
        "The package is verified first; other models in the repository are left alone.",
        epilog="""\
examples:
  mmpipe triton-repo --package packages/retail --out triton-repo
  mmpipe triton-repo --package packages/retail --out triton-repo --instance-kind gpu --instances 2 --tensorrt
  mmpipe triton-repo --package packages/retail --out triton-repo --variant onnx-int8 --instance-kind cpu
  mmpipe triton-repo --package packages/medical --out triton-repo --config mmpipe.yaml   # generate + limits

serve (GPU image with the onnxruntime backend):
  tritonserver --model-repository triton-repo
serve (CPU, python backend only, e.g. the nvidia-pytriton wheel):
  tritonserver --model-repository triton-repo --model-control-mode explicit \\
      --load-model NAME_preprocess --load-model NAME_cpu --load-model NAME_ensemble_cpu \\
      --load-model NAME_generate
  mmpipe serve --backend triton --repository triton-repo --cpu-only   # the same (PATH or pytriton binary)""",
    )
    p.add_argument("--package", required=True, help="model package directory with an ONNX variant (mmpipe export)")
    p.add_argument("--out", required=True, help="model repository root (created; other models kept)")
    p.add_argument("--variant", default="onnx-fp32", help="package variant to serve (default onnx-fp32)")
    p.add_argument("--name", help="Triton model name (default: the package name)")
    p.add_argument("--model-version", type=int, default=1, help="model version directory (default 1)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--preferred-batch-sizes", default="8,16,32", help="comma-separated; '' for none")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--instance-kind", choices=sorted(_KINDS), default="auto",
                   help="auto: GPU when the server has one, else CPU")
    p.add_argument("--instances", type=int, default=1, help="instances of the ONNX model")
    p.add_argument("--preprocess-instances", type=int, default=2)
    p.add_argument("--tensorrt", action="store_true", help="TensorRT accelerator for the onnxruntime backend")
    p.add_argument("--tensorrt-precision", choices=_TRT_PRECISIONS, default="FP16")
    p.add_argument("--tensorrt-cache-dir", help="engine cache directory on the server (enables caching)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--version-policy", default="latest:1", help="latest:N | all | specific:V1,V2")
    p.add_argument("--no-cpu-models", action="store_true", help="omit NAME_cpu and NAME_ensemble_cpu")
    p.add_argument("--pythonpath", help="where the python-backend models import mmpipe from on the server "
                   "(default: this checkout; '' = the server Python's own packages)")
    p.add_argument("--config", "-c", metavar="YAML", help="mmpipe settings file: its 'generate' and 'limits' "
                   "sections become NAME_generate's settings (default: built-in defaults)")
    p.add_argument("--no-generate", action="store_true", help="omit NAME_generate even when the package has "
                   "an exported generative head")
    p.add_argument("--generate-instances", type=int, default=1, help="instances of NAME_generate (each decodes "
                   "one request at a time)")
    p.set_defaults(func=cmd_triton_repo)
    return p


def cmd_triton_repo(args: argparse.Namespace) -> int:
    try:
        preferred = tuple(int(b) for b in args.preferred_batch_sizes.split(",") if b.strip())
    except ValueError:
        print(f"error: --preferred-batch-sizes {args.preferred_batch_sizes!r} is not a list of integers",
              file=sys.stderr)
        return 2
    from pipeline.config import load_settings
    from pipeline.errors import ConfigError

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        repo = build_triton_repo(
            args.package, args.out, variant=args.variant, max_batch_size=args.max_batch_size,
            preferred_batch_sizes=preferred, max_queue_delay_us=args.max_queue_delay_us,
            instance_kind=args.instance_kind, instance_count=args.instances, tensorrt=args.tensorrt,
            tensorrt_precision=args.tensorrt_precision, tensorrt_cache_dir=args.tensorrt_cache_dir,
            warmup=not args.no_warmup, version_policy=args.version_policy,
            cpu_python_backend=not args.no_cpu_models, model_name=args.name, model_version=args.model_version,
            preprocess_instance_count=args.preprocess_instances, pythonpath=args.pythonpath,
            generate=False if args.no_generate else None, generate_config=settings.generate,
            limits=settings.limits, generate_instance_count=args.generate_instances,
        )
    except TritonRepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from pipeline.package import read_manifest

    manifest = read_manifest(Path(args.package))
    name = args.name or manifest.name
    generate = not args.no_generate and any(v.startswith("generate-") for v in manifest.variants)
    which = repository_models(name, cpu_python_backend=not args.no_cpu_models, generate=generate)
    print(f"Triton models for {name} written to {repo}")
    print(json.dumps(which, indent=2))
    return 0
