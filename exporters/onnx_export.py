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
   (CPU), or static QDQ quantization calibrated on sample records; heads
   (and the fusion family's fusion layer) stay fp32 (``exporters.quantize``).

A variant whose parity check fails is not written; the command fails.
Parity also runs each variant on the same records at batch 1 and batch 16:
a record's scores must not depend on its neighbours.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from exporters import parity, quantize
from pipeline.errors import PackageError, RecordError
from pipeline.log import log_event
from pipeline.package import ModelPackage, Variant, load_package, write_manifest
from pipeline.preprocess import Prepared, Preprocessor

logger = logging.getLogger(__name__)

OPSET = 17
VARIANT_FILES = {"fp32": "onnx/model.onnx", "fp16": "onnx/model.fp16.onnx", "int8": "onnx/model.int8.onnx"}


class ExportError(Exception):
    """An export failed or did not compute the same function."""


# -- sample records ------------------------------------------------------------------
MIN_SAMPLES = 8


@dataclass
class Samples:
    """Decoded sample records, and what became of the others: not used (by
    reason code) and modalities the model does not take, ignored (by
    modality, in how many records)."""

    prepared: list[Prepared]
    given: int
    not_used: dict[str, int] = field(default_factory=dict)
    extra_ignored: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first message (mmpipe's words)

    def report(self) -> dict[str, Any]:
        return {"given": self.given, "used": len(self.prepared), "not_used": dict(self.not_used),
                "extra_ignored": dict(self.extra_ignored)}

    def why_not(self) -> str:
        """The reasons records were not used, for an error message."""
        if not self.not_used:
            return "no records given"
        return "; ".join(f"{n} {code} (e.g. {self.examples[code]})" for code, n in
                         sorted(self.not_used.items(), key=lambda kv: -kv[1]))


def sample_set(pkg: ModelPackage, records: list | None, n: int = 96, seed: int = 123) -> Samples:
    """Decoded sample records for parity and calibration: the caller's, or
    generated ones for the built-in workloads (a third with modalities
    missing).  A field of a modality the model does not take is ignored
    here (and counted): it is not what parity is about."""
    from pipeline.config import Limits

    pre = Preprocessor.for_package(pkg, Limits(extra_modalities="ignore"))
    if records is None:
        from pipeline.spec import BUILTIN_WORKLOADS
        from pipeline.tooling import sample_data

        if pkg.spec.name not in BUILTIN_WORKLOADS:
            raise ExportError(
                f"workload {pkg.spec.name!r} has no built-in sample data: pass sample records "
                "(--samples records.jsonl) for the parity check"
            )
        records = [s.record for s in sample_data.generate(pkg.spec.name, n, seed=seed, missing_rate=0.3)]
    out = Samples(prepared=[], given=len(records))
    for r in records:
        ignored: set[str] = set()
        pre.on_extra_modality = ignored.add
        try:
            out.prepared.append(pre.prepare(r))
        except RecordError as err:
            _not_used(out, err.code.value, err.message)
            continue
        except Exception as exc:  # a decoder bug: say so, do not stop the export
            _not_used(out, "internal_error", type(exc).__name__)
            continue
        for m in ignored:
            out.extra_ignored[m] = out.extra_ignored.get(m, 0) + 1
    if len(out.prepared) < MIN_SAMPLES:
        raise ExportError(f"only {len(out.prepared)} of {out.given} sample records are usable; parity needs at "
                          f"least {MIN_SAMPLES}. Not used: {out.why_not()}")
    return out


def _not_used(out: Samples, code: str, message: str) -> None:
    out.not_used[code] = out.not_used.get(code, 0) + 1
    out.examples.setdefault(code, message[:200])


def sample_prepared(pkg: ModelPackage, records: list | None, n: int = 96, seed: int = 123) -> list[Prepared]:
    """The decoded records of :func:`sample_set`."""
    return sample_set(pkg, records, n, seed).prepared


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
                do_constant_folding=True, dynamo=False, custom_opsets={"com.microsoft": 1},
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


# -- parity ---------------------------------------------------------------------------------
BATCH_CHECK = (1, 16)  # a record alone, and among 15 neighbours
BATCH_CHECK_RECORDS = 32


class _Pair:
    """The PyTorch reference and an ONNX engine on the same feeds, outputs
    by head."""

    def __init__(self, pkg: ModelPackage, model: Any, engine: Any) -> None:
        self.pkg, self.model, self.engine = pkg, model, engine
        self.pre = Preprocessor.for_package(pkg)
        self.by_head = pkg.manifest.signature.head_outputs()
        text = pkg.spec.preprocessing.text
        self.mask_name = self.pre.input_name("text.attention_mask") if text else None

    def _heads(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {h: out[o] for h, o in self.by_head.items()}

    def ref(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            return self._heads({k: v.numpy() for k, v in self.model.run(feeds).items()})

    def got(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._heads(self.engine.run(feeds))
        except Exception as exc:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ExportError(
                f"the exported graph fails on inputs shaped {shapes} ({type(exc).__name__}: {str(exc)[:300]}); "
                "the exporter may have fixed a dim to the example batch's (a shape the model computes in Python, "
                "e.g. a reshape by the sequence length): compute it from the tensor's shape in the model"
            ) from None

    def mask(self, feeds: dict[str, np.ndarray]) -> np.ndarray | None:
        return feeds.get(self.mask_name) if self.mask_name else None


def _random_cases(pair: _Pair, batch_sizes: tuple[int, ...], seed: int) -> tuple[dict[str, dict[str, float]], int]:
    """Random inputs over the signature's whole input space."""
    pkg = pair.pkg
    sig = pkg.manifest.signature.model_dump()
    for t, spec in zip(sig["inputs"], pkg.manifest.signature.inputs, strict=True):
        t["feature"] = spec.feature_name()
    text = pkg.spec.preprocessing.text
    vocab = pkg.text_encoder().vocab_size if text else 0  # type: ignore[union-attr]
    max_len = text.max_length if text else 1
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {}
    cases = 0
    # A model without an attention mask is only ever fed max_length (see Preprocessor.collate).
    seqs = [max_len] if pkg.manifest.signature.needs_fixed_length else sorted({min(4, max_len), min(17, max_len),
                                                                              max_len})
    for b in batch_sizes:
        for s in seqs if text else [1]:
            feeds = parity.random_feeds(sig, b, s, vocab, len(pkg.spec.modalities), rng)
            diffs, _ = parity.compare_decisions(pkg.spec, pair.ref(feeds), pair.got(feeds), pair.mask(feeds))
            parity.merge_max(worst, diffs)
            cases += 1
    return worst, cases


def _sample_cases(pair: _Pair, samples: list[Prepared], batch_sizes: tuple[int, ...], tol: parity.Tolerance,
                  ) -> tuple[dict[str, dict[str, float]], parity.Decisions, int]:
    """Real records, batched as the Predictor batches them."""
    worst: dict[str, dict[str, float]] = {}
    decisions = parity.Decisions()
    cases = 0
    for b in batch_sizes:
        for start in range(0, len(samples), b * 4):
            feeds = pair.pre.collate(samples[start : start + b])
            diffs, d = parity.compare_decisions(pair.pkg.spec, pair.ref(feeds), pair.got(feeds), pair.mask(feeds),
                                                tol)
            parity.merge_max(worst, diffs)
            decisions.add(d)
            cases += 1
    return worst, decisions, cases


def batch_consistency(pair: _Pair, samples: list[Prepared]) -> dict[str, Any]:
    """The variant on the same records alone and in batches of 16, collated
    by the Preprocessor as every path collates them."""
    subset = samples[:BATCH_CHECK_RECORDS]
    size = BATCH_CHECK[1]
    single = [pair.got(pair.pre.collate([p])) for p in subset]
    batched = [pair.got(pair.pre.collate(subset[i : i + size])) for i in range(0, len(subset), size)]
    return {"sizes": list(BATCH_CHECK), "records": len(subset),
            "max": parity.batch_diffs(pair.pkg.spec, single, batched)}


def _judge(precision: str, tol: parity.Tolerance, worst: dict[str, dict[str, float]],
           sample_worst: dict[str, dict[str, float]], decisions: parity.Decisions,
           batch: dict[str, Any], fixed_length: bool) -> list[str]:
    failures = []
    # fp32 must match everywhere; reduced precisions are judged on real records.
    judged = worst if precision == "fp32" else sample_worst
    for out, d in judged.items():
        if tol.logit_abs is not None and d["logit_abs"] > tol.logit_abs:
            failures.append(f"{out}: max |dlogit| {d['logit_abs']:.3g} > {tol.logit_abs}")
        if d["prob_abs"] > tol.prob_abs:
            failures.append(f"{out}: max |dprob| {d['prob_abs']:.3g} > {tol.prob_abs}")
    if decisions.agreement < tol.agreement:
        failures.append(f"label agreement {decisions.agreement:.2%} < {tol.agreement:.0%} ({decisions.disagree} "
                        f"of {decisions.total} decisions differ where the reference is clear of the tolerance; "
                        f"{decisions.near_ties} near-ties not counted)")
    sizes = batch["sizes"]
    why = ("" if fixed_length else "; the model lets padding or other records reach a record's result")
    for out, d in batch["max"].items():
        over = [f"max |dlogit| {d['logit_abs']:.3g} > {tol.logit_abs}"] if (
            tol.logit_abs is not None and d["logit_abs"] > tol.logit_abs) else []
        over += [f"max |dprob| {d['prob_abs']:.3g} > {tol.prob_abs}"] if d["prob_abs"] > tol.prob_abs else []
        if over:
            failures.append(f"{out}: a record's scores depend on its batch (batch {sizes[0]} vs {sizes[1]}: "
                            f"{', '.join(over)}){why}")
    return failures


def check_parity(
    pkg: ModelPackage, model, onnx_path: Path, precision: str, samples: list[Prepared], *,
    batch_sizes: tuple[int, ...] = (1, 4, 16), seed: int = 0, providers: list[str] | None = None,
) -> dict[str, Any]:
    """Compare an ONNX file with the PyTorch model; returns the variant's report."""
    from pipeline.engines.onnx_engine import OnnxRuntimeEngine

    tol = parity.TOLERANCES[precision]
    engine = OnnxRuntimeEngine(onnx_path, device="cpu" if providers is None else "auto", providers=providers,
                               graph_optimization="all")
    try:
        pair = _Pair(pkg, model, engine)
        worst, random_cases = _random_cases(pair, batch_sizes, seed)
        sample_worst, decisions, sample_cases = _sample_cases(pair, samples, batch_sizes, tol)
        parity.merge_max(worst, sample_worst)
        batch = batch_consistency(pair, samples)
        provider = engine.provider
    finally:
        engine.close()
    failures = _judge(precision, tol, worst, sample_worst, decisions, batch,
                      pkg.manifest.signature.needs_fixed_length)
    return {
        "passed": not failures, "failures": failures, "max": worst, "sample_max": sample_worst,
        "sample_agreement": decisions.agreement, "decisions": decisions.total, "near_ties": decisions.near_ties,
        "disagreements": decisions.disagree, "sample_records": len(samples), "cases": random_cases + sample_cases,
        "batch": batch, "provider": provider,
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
def fixed_length_warning(pkg: ModelPackage) -> str | None:
    """What a model without an attention-mask input costs, or None."""
    text = pkg.spec.preprocessing.text
    if text is None or not pkg.manifest.signature.needs_fixed_length:
        return None
    return (f"the model takes no attention mask, so padding would reach its results: every batch is padded to "
            f"the text max_length ({text.max_length}) for a record's answer not to depend on its neighbours, "
            "which costs time on short texts; give the model an attention-mask input (feature attention_mask in "
            "the signature) to pad only to the longest text")


def _int8(pkg: ModelPackage, fp32: Path, dst: Path, *, family: bool, static: bool, pre: Preprocessor,
          samples: list[Prepared]) -> dict[str, Any]:
    """The int8 file, or ExportError when it would not be int8; returns the
    quantization summary for the report."""
    outputs = [o.name for o in pkg.manifest.signature.outputs]
    p = quantize.plan(fp32, outputs, family=family)
    if not p.to_quantize:
        raise ExportError(f"int8 variant refused: {quantize.nothing_to_quantize(p)}; drop int8 from --variants")
    if static:
        calib = [pre.collate(samples[i : i + 8]) for i in range(0, len(samples), 8)]
        quantize.to_int8_static(fp32, dst, p, calib)
    else:
        quantize.to_int8_dynamic(fp32, dst, p)
    summary = quantize.summary(p, fp32, dst)
    if summary["quantized"] == 0:
        raise ExportError(f"int8 variant refused: the quantizer left all {len(p.to_quantize)} planned MatMul/Gemm "
                          "nodes in fp32, so the file would be the fp32 model under another name; drop int8 "
                          "from --variants")
    log_event(logger, logging.INFO, "int8_quantized", quantized=summary["quantized"],
              weight_nodes=summary["weight_nodes"], size_ratio=summary["size_ratio"])
    return summary


def _install(pkg: ModelPackage, built: dict[str, Path], report: dict[str, Any], static_int8: bool) -> None:
    """Files first, then the manifest (atomic)."""
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


def _provider_for(name: str, path: Path, gpu_providers: list[str] | None) -> list[str] | None:
    """fp16 runs on GPU providers; refused where this machine cannot run it."""
    if name != "fp16":
        return None
    why = _runs_here(path)
    if why is not None and not gpu_providers:
        raise ExportError("the fp16 variant cannot run on this machine's CPU provider "
                          f"({why}); export fp16 on a GPU node (--variants fp16 there)")
    return gpu_providers


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
    family = model is None
    if family:
        from pipeline.tooling.torch_engine import load_model

        if "torch" not in pkg.manifest.variants:
            raise PackageError(f"package {pkg.name} has no PyTorch weights to export from")
        model = load_model(pkg.path("model/model.safetensors").parent)
    sampled = sample_set(pkg, sample_records)
    samples = sampled.prepared
    pre = Preprocessor.for_package(pkg)
    outputs = [o.model_dump() for o in pkg.manifest.signature.outputs]
    inputs = [i.model_dump() for i in pkg.manifest.signature.inputs]
    report: dict[str, Any] = {"checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
                              "opset": OPSET, "variants": {}, "samples": sampled.report(), "warnings": []}
    warning = fixed_length_warning(pkg)
    if warning:
        report["warnings"].append(warning)
        log_event(logger, logging.WARNING, "model_without_attention_mask", model=pkg.name)
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
        quantization = None
        if "int8" in variants:
            built["int8"] = work / "model.int8.onnx"
            quantization = _int8(pkg, fp32, built["int8"], family=family, static=static_int8, pre=pre,
                                 samples=samples)
        failures = []
        for name, path in built.items():
            r = check_parity(pkg, model, path, name, samples, providers=_provider_for(name, path, gpu_providers))
            r["static"] = bool(static_int8) if name == "int8" else None
            if name == "int8":
                r["quantization"] = quantization
            report["variants"][name] = r
            if not r["passed"]:
                failures.append(name)
        print(parity.format_report(report))
        if failures:
            raise ExportError(f"parity check failed for {', '.join(failures)}: " + "; ".join(
                f for n in failures for f in report["variants"][n]["failures"]))
        _install(pkg, built, report, static_int8)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from exporters.generative import export_generative, has_generative

    if has_generative(pkg):  # its own graphs (KV cache) and token parity
        pkg, report["generation"] = export_generative(pkg.root, variants, sample_records=sample_records,
                                                      model=model)
    return load_package(pkg.root), report
