"""PyTorch fusion model -> ONNX (fp32, fp16, int8) inside its model package.

Steps, each followed by a parity check against the PyTorch model:

1. ``torch.onnx.export`` (TorchScript exporter, pinned opset) with every head
   a named output and dynamic ``batch`` and ``sequence`` axes;
2. offline ONNX Runtime graph optimization at the *basic* level, which only
   applies provider-independent rewrites, so the file stays valid for the
   CPU, CUDA and TensorRT providers (the rest is applied at load time);
3. ``fp16``: weights and activations in half precision with fp32 inputs and
   outputs kept (for GPU providers);
4. ``int8``: dynamic quantization of MatMul/Gemm with unsigned 8-bit weights
   (CPU), or static QDQ quantization calibrated on sample records.

A variant whose parity check fails is not written; the command fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from exporters import parity
from pipeline.errors import PackageError
from pipeline.log import log_event
from pipeline.package import ModelPackage, Variant, load_package, write_manifest
from pipeline.preprocess import Prepared, Preprocessor

logger = logging.getLogger(__name__)

OPSET = 17
VARIANT_FILES = {"fp32": "onnx/model.onnx", "fp16": "onnx/model.fp16.onnx", "int8": "onnx/model.int8.onnx"}


class ExportError(Exception):
    """An export failed or did not compute the same function."""


# -- sample records ------------------------------------------------------------------
def sample_prepared(pkg: ModelPackage, records: list | None, n: int = 96, seed: int = 123) -> list[Prepared]:
    """Decoded sample records for parity and calibration: the caller's, or
    generated ones for the built-in workloads (a third with modalities
    missing)."""
    pre = Preprocessor.for_package(pkg)
    if records is None:
        from pipeline import sample_data
        from pipeline.spec import BUILTIN_WORKLOADS

        if pkg.spec.name not in BUILTIN_WORKLOADS:
            raise ExportError(
                f"workload {pkg.spec.name!r} has no built-in sample data: pass sample records "
                "(--samples records.jsonl) for the parity check"
            )
        records = [s.record for s in sample_data.generate(pkg.spec.name, n, seed=seed, missing_rate=0.3)]
    prepared = []
    for r in records:
        try:
            prepared.append(pre.prepare(r))
        except Exception:  # broken sample records are simply not used
            continue
    if len(prepared) < 8:
        raise ExportError(f"only {len(prepared)} usable sample records; parity needs at least 8")
    return prepared


# -- export steps ------------------------------------------------------------------------
def _dynamic_axes(inputs: list[dict], outputs: list[dict]) -> dict[str, dict[int, str]]:
    """Every symbolic dim of the signature (``batch``, ``sequence``...) is dynamic."""
    return {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in [*inputs, *outputs]}


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Silence C-level stdout/stderr around the TorchScript exporter: it
    prints whole graphs when it fails (the ExportError says what matters)
    and tracer warnings when it succeeds."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def unsupported_op(exc: BaseException) -> str | None:
    """The operator named by a TorchScript exporter error, if it names one."""
    import re

    m = re.search(r"operator '?([A-Za-z_]+::[A-Za-z0-9_.]+)'?", str(exc))
    return m.group(1) if m else None


def export_fp32(model, example: dict[str, np.ndarray], out: Path, outputs: list[dict],
                inputs: list[dict] | None = None) -> None:
    """``inputs``/``outputs``: the signature entries (their symbolic dims
    become dynamic axes); ``inputs`` defaults to the fusion family's."""
    import torch

    if inputs is None:
        inputs = [{"name": n, "shape": ["batch", "sequence"] if n in ("input_ids", "attention_mask") else ["batch"]}
                  for n in model.input_names]
    args = tuple(torch.from_numpy(example[n]) for n in model.input_names)
    model.eval()  # the exporter restores the module's mode afterwards: it must already be eval
    try:
        with _quiet_fds():
            torch.onnx.export(
                model, args, str(out), input_names=model.input_names, output_names=model.output_names,
                dynamic_axes=_dynamic_axes(inputs, outputs), opset_version=OPSET,
                do_constant_folding=True, dynamo=False,
            )
    except Exception as exc:
        op = unsupported_op(exc)
        if op is not None:
            raise ExportError(
                f"the ONNX exporter cannot handle operator {op} at opset {OPSET} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); rewrite that step of the model "
                "with operators ONNX supports, or compute it outside the model"
            ) from exc
        raise ExportError(f"torch.onnx.export failed at opset {OPSET}: {type(exc).__name__}: {exc}") from exc
    import onnx

    onnx.checker.check_model(str(out))


def optimize_offline(src: Path, dst: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


_TOWER_PREFIXES = ("/text/", "/image/", "/audio/", "/tabular/")


def _keep_fp32_nodes(src: Path) -> list[str]:
    """MatMul/Gemm nodes outside the towers (fusion layer and heads): a tiny
    share of the compute, but where rounding moves decisions most directly."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    return [n.name for n in graph.node
            if n.op_type in ("MatMul", "Gemm") and not n.name.startswith(_TOWER_PREFIXES)]


def to_int8_dynamic(src: Path, dst: Path) -> None:
    """Dynamic int8 on the towers' MatMul/Gemm, unsigned per-channel weights
    (integer convolutions are slower than fp32 on CPUs without VNNI)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QUInt8,
                     per_channel=True, nodes_to_exclude=_keep_fp32_nodes(src))


def to_int8_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(
        str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, per_channel=True,
        nodes_to_exclude=_keep_fp32_nodes(src),
    )


# -- parity ---------------------------------------------------------------------------------
def check_parity(
    pkg: ModelPackage, model, onnx_path: Path, precision: str, samples: list[Prepared], *,
    batch_sizes: tuple[int, ...] = (1, 4, 16), seed: int = 0, providers: list[str] | None = None,
) -> dict[str, Any]:
    """Compare an ONNX file with the PyTorch model; returns the variant's report."""
    import torch

    from pipeline.engines.onnx_engine import OnnxRuntimeEngine

    tol = parity.TOLERANCES[precision]
    engine = OnnxRuntimeEngine(onnx_path, device="cpu" if providers is None else "auto", providers=providers,
                               graph_optimization="all")
    pre = Preprocessor.for_package(pkg)
    sig = pkg.manifest.signature.model_dump()
    for t, spec in zip(sig["inputs"], pkg.manifest.signature.inputs, strict=True):
        t["feature"] = spec.feature_name()
    text = pkg.spec.preprocessing.text
    vocab = pkg.text_encoder().vocab_size if text else 0
    max_len = text.max_length if text else 1
    rng = np.random.default_rng(seed)
    by_head = pkg.manifest.signature.head_outputs()
    mask_name = pre.input_name("text.attention_mask") if text else None

    def heads(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {h: out[o] for h, o in by_head.items()}

    def ref_run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return heads({k: v.numpy() for k, v in model.run(feeds).items()})

    def onnx_run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return heads(engine.run(feeds))

    def token_mask(feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        return feeds.get(mask_name) if mask_name else None

    worst: dict[str, dict[str, float]] = {}
    cases = 0
    seqs = sorted({min(4, max_len), min(17, max_len), max_len})
    for b in batch_sizes:
        for s in seqs if text else [1]:
            feeds = parity.random_feeds(sig, b, s, vocab, len(pkg.spec.modalities), rng)
            diffs, _, _ = parity.compare(pkg.spec, ref_run(feeds), onnx_run(feeds), token_mask(feeds))
            parity.merge_max(worst, diffs)
            cases += 1
    agree = total = 0
    sample_worst: dict[str, dict[str, float]] = {}
    for b in batch_sizes:
        for start in range(0, len(samples), b * 4):
            chunk = samples[start : start + b]
            feeds = pre.collate(chunk)
            diffs, a, t = parity.compare(pkg.spec, ref_run(feeds), onnx_run(feeds), token_mask(feeds))
            parity.merge_max(sample_worst, diffs)
            parity.merge_max(worst, diffs)
            agree, total, cases = agree + a, total + t, cases + 1
    agreement = agree / total if total else 1.0
    failures = []
    # fp32 must match everywhere; reduced precisions are judged on real records.
    judged = worst if precision == "fp32" else sample_worst
    for out, d in judged.items():
        if tol.logit_abs is not None and d["logit_abs"] > tol.logit_abs:
            failures.append(f"{out}: max |dlogit| {d['logit_abs']:.3g} > {tol.logit_abs}")
        if d["prob_abs"] > tol.prob_abs:
            failures.append(f"{out}: max |dprob| {d['prob_abs']:.3g} > {tol.prob_abs}")
    if agreement < tol.agreement:
        failures.append(f"label agreement {agreement:.2%} < {tol.agreement:.0%}")
    provider = engine.provider
    engine.close()
    return {
        "passed": not failures, "failures": failures, "max": worst, "sample_max": sample_worst,
        "sample_agreement": agreement, "sample_records": len(samples), "cases": cases, "provider": provider,
        "tolerance": {"logit_abs": tol.logit_abs, "prob_abs": tol.prob_abs, "agreement": tol.agreement},
    }


def _runs_here(onnx_path: Path) -> str | None:
    """Why this machine cannot run a variant, or None if it can."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return None


def trt_profiles(pkg: ModelPackage, max_batch: int = 64) -> dict[str, str]:
    """TensorRT optimization profiles (min / opt / max) for the dynamic axes."""
    text = pkg.spec.preprocessing.text
    max_len = text.max_length if text else 1
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for spec in pkg.manifest.signature.inputs:
        for key, batch, seq in (("min", 1, 2), ("opt", max(1, max_batch // 4), max(2, max_len // 2)),
                                ("max", max_batch, max_len)):
            dims = [batch if d == "batch" else seq if d == "sequence" else int(d) for d in spec.shape]
            shapes[key].append(f"{spec.name}:{'x'.join(str(d) for d in dims)}")
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in shapes.items()}


# -- the whole export ----------------------------------------------------------------------
def export_package(
    package_dir: str | Path,
    variants: tuple[str, ...] = ("fp32", "int8"),
    *,
    static_int8: bool = False,
    sample_records: list | None = None,
    gpu_providers: list[str] | None = None,
    model: Any = None,
) -> tuple[ModelPackage, dict[str, Any]]:
    """Export ONNX variants into a package; every variant passes parity or
    the export fails and the package is left as it was.  fp32 is always
    exported: the other variants are derived from it.

    ``model``: the PyTorch reference to export (``input_names``,
    ``output_names``, ``run(feeds)``, forward taking the inputs in order), for
    a model brought from elsewhere; default: the package's own weights."""
    pkg = load_package(package_dir)
    unknown = set(variants) - set(VARIANT_FILES)
    if unknown:
        raise ExportError(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANT_FILES)}")
    if model is None:
        from pipeline.engines.torch_engine import load_model

        if "torch" not in pkg.manifest.variants:
            raise PackageError(f"package {pkg.name} has no PyTorch weights to export from")
        model = load_model(pkg.path("model/model.safetensors").parent)
    samples = sample_prepared(pkg, sample_records)
    pre = Preprocessor.for_package(pkg)
    outputs = [o.model_dump() for o in pkg.manifest.signature.outputs]
    inputs = [i.model_dump() for i in pkg.manifest.signature.inputs]
    report: dict[str, Any] = {"checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
                              "opset": OPSET, "variants": {}}
    work = Path(tempfile.mkdtemp(prefix="mmpipe-export-"))
    try:
        raw = work / "raw.onnx"
        t0 = time.perf_counter()
        export_fp32(model, pre.collate(samples[:2]), raw, outputs, inputs)
        fp32 = work / "model.onnx"
        optimize_offline(raw, fp32)
        log_event(logger, logging.INFO, "onnx_exported", seconds=round(time.perf_counter() - t0, 2), opset=OPSET)
        built = {"fp32": fp32}
        if "fp16" in variants:
            built["fp16"] = work / "model.fp16.onnx"
            to_fp16(fp32, built["fp16"])
        if "int8" in variants:
            built["int8"] = work / "model.int8.onnx"
            if static_int8:
                calib = [pre.collate(samples[i : i + 8]) for i in range(0, len(samples), 8)]
                to_int8_static(fp32, built["int8"], calib)
            else:
                to_int8_dynamic(fp32, built["int8"])
        failures = []
        for name in ("fp32", "fp16", "int8"):
            if name not in built:
                continue
            providers = None
            if name == "fp16":
                why = _runs_here(built[name])
                if why is not None and not gpu_providers:
                    raise ExportError(
                        "the fp16 variant cannot run on this machine's CPU provider "
                        f"({why}); export fp16 on a GPU node (--variants fp16 there)"
                    )
                providers = gpu_providers
            r = check_parity(pkg, model, built[name], name, samples, providers=providers)
            r["static"] = bool(static_int8) if name == "int8" else None
            report["variants"][name] = r
            if not r["passed"]:
                failures.append(name)
        print(parity.format_report(report))
        if failures:
            raise ExportError(f"parity check failed for {', '.join(failures)}: " + "; ".join(
                f for n in failures for f in report["variants"][n]["failures"]))
        # Install into the package: files first, then the manifest (atomic).
        (pkg.root / "onnx").mkdir(exist_ok=True)
        manifest = pkg.manifest
        profiles = trt_profiles(pkg)
        for name in ("fp32", "fp16", "int8"):
            if name not in built:
                continue
            rel = VARIANT_FILES[name]
            shutil.copyfile(built[name], pkg.root / rel)
            manifest.files[rel] = ""
            manifest.variants[f"onnx-{name}"] = Variant(
                engine="onnxruntime", files=[rel], precision=name, opset=OPSET,
                quantization=("static-qdq" if static_int8 else "dynamic") if name == "int8" else None,
                trt_profiles=profiles,
            )
        manifest.parity = report
        write_manifest(pkg.root, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from exporters.generative import export_generative, has_generative

    if has_generative(pkg):  # its own graphs (KV cache) and token parity
        pkg, report["generation"] = export_generative(pkg.root, variants, sample_records=sample_records,
                                                      model=model)
    return load_package(pkg.root), report
