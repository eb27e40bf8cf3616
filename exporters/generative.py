"""A package's generative head -> ONNX graphs with a key/value cache.

Three graphs per variant, each exported from the PyTorch module of the same
name in ``pipeline.tooling.model.generative``:

* ``encoder``: the fusion inputs -> ``prefix_embeds`` [batch, prefix, embd];
* ``decoder_init``: prefix + prompt -> ``logits`` [batch, vocab] of the
  last position and ``present_{key,value}_i`` [batch, heads, past, head_dim];
* ``decoder_step``: new ids + ``past_{key,value}_i`` -> logits and the
  longer cache.

Two decoder graphs rather than one merged graph with a cache branch:
each is a straight line that every provider (TensorRT included) optimises
whole, and the first step never carries an empty cache.  ``batch``,
``sequence``, ``past`` (and ``total``) axes are dynamic.  Variants: fp32,
fp16 (fp32 inputs/outputs kept) and int8 (dynamic quantization of the
weight MatMuls; the LM head stays fp32, where rounding moves the argmax
most directly).

Parity is judged on generated tokens, with the decoding loop the runtime
uses: fp32 must give *identical* greedy tokens to PyTorch on random inputs
and on sample records; fp16 and int8 must agree on >= 99% of the tokens of
sample records.  A failing variant fails the export and nothing is
installed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.onnx_export import OPSET, ExportError, export_fp32, optimize_offline, sample_prepared, to_fp16
from pipeline.config import EngineConfig
from pipeline.generate import GRAPHS, OrtBackend, decode, prompt_ids
from pipeline.log import log_event
from pipeline.package import ModelPackage, Variant, load_package, write_manifest
from pipeline.preprocess import Prepared, Preprocessor
from pipeline.tokenizer import DecoderTokenizer

logger = logging.getLogger(__name__)

TOKENIZER = "model/decoder_tokenizer.json"
PACKAGE_TOKENIZER = "generate/tokenizer.json"
SUFFIX = {"fp32": "", "fp16": ".fp16", "int8": ".int8"}
AGREEMENT = {"fp32": 1.0, "fp16": 0.99, "int8": 0.99}


def has_generative(pkg: ModelPackage) -> bool:
    """Whether the package's PyTorch model carries a generative head."""
    return TOKENIZER in pkg.manifest.files


def _graph_specs(model) -> dict[str, tuple[list[dict], list[dict]]]:
    """Inputs and outputs of each graph with their symbolic dims."""
    g = model.cfg.generative
    cache = ["batch", g.n_head, "past", g.n_embd // g.n_head]
    present = ["batch", g.n_head, "total", g.n_embd // g.n_head]
    sig_in = [{"name": n, "shape": (["batch", "sequence"] if n in ("input_ids", "attention_mask") else ["batch"])}
              for n in model.input_names]
    from pipeline.tooling.model.generative import cache_names

    presents = [{"name": n, "shape": present} for n in cache_names(g.n_layer, "present")]
    logits = {"name": "logits", "shape": ["batch", g.vocab_size]}
    ids = {"name": "input_ids", "shape": ["batch", "sequence"]}
    mask = {"name": "attention_mask", "shape": ["batch", "total"]}
    return {
        "encoder": (sig_in, [{"name": "prefix_embeds", "shape": ["batch", "prefix", g.n_embd]}]),
        "decoder_init": ([{"name": "prefix_embeds", "shape": ["batch", "prefix", g.n_embd]}, ids, mask,
                          {"name": "position_ids", "shape": ["batch", "total"]}], [logits, *presents]),
        "decoder_step": ([ids, mask, {"name": "position_ids", "shape": ["batch", "sequence"]},
                          *({"name": n, "shape": cache} for n in cache_names(g.n_layer, "past"))],
                         [logits, *presents]),
    }


def _examples(model, feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Example inputs for tracing each graph (batch 2, non-trivial lengths)."""
    import torch

    from pipeline.tooling.model.generative import DecoderInitGraph, EncoderGraph

    g = model.cfg.generative
    with torch.inference_mode():
        prefix = EncoderGraph(model)(*[torch.as_tensor(feeds[n]) for n in model.input_names]).numpy()
    p, t = prefix.shape[1], 3
    mask = np.ones((2, p + t), dtype=np.int64)
    init = {"prefix_embeds": prefix, "input_ids": np.full((2, t), g.bos_id, dtype=np.int64),
            "attention_mask": mask, "position_ids": np.tile(np.arange(p + t, dtype=np.int64), (2, 1))}
    with torch.inference_mode():
        out = DecoderInitGraph(model)(*[torch.from_numpy(v) for v in init.values()])
    step = {"input_ids": np.full((2, 1), g.bos_id, dtype=np.int64),
            "attention_mask": np.ones((2, p + t + 1), dtype=np.int64),
            "position_ids": np.full((2, 1), p + t, dtype=np.int64)}
    from pipeline.tooling.model.generative import cache_names

    step.update({n: o.numpy() for n, o in zip(cache_names(g.n_layer, "past"), out[1:], strict=True)})
    return {"encoder": feeds, "decoder_init": init, "decoder_step": step}


def _to_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 of the weight MatMuls, the LM head (the graph's last
    MatMul, onto the tied embedding) kept in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    keep = matmuls[-1:] if "decoder" in src.name else []
    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QUInt8,
                     per_channel=True, nodes_to_exclude=keep)


def build_graphs(model, feeds: dict[str, np.ndarray], work: Path, variants: tuple[str, ...]
                 ) -> dict[str, dict[str, Path]]:
    """Export, optimise and derive every variant's three graphs under ``work``."""
    from pipeline.tooling.model.generative import DecoderInitGraph, DecoderStepGraph, EncoderGraph

    modules = {"encoder": EncoderGraph(model), "decoder_init": DecoderInitGraph(model),
               "decoder_step": DecoderStepGraph(model)}
    specs, examples = _graph_specs(model), _examples(model, feeds)
    built: dict[str, dict[str, Path]] = {v: {} for v in variants}
    for g in GRAPHS:
        raw, fp32 = work / f"{g}.raw.onnx", work / f"{g}.onnx"
        inputs, outputs = specs[g]
        export_fp32(modules[g], examples[g], raw, outputs, inputs)
        optimize_offline(raw, fp32)
        built["fp32"][g] = fp32
        if "fp16" in built:
            built["fp16"][g] = work / f"{g}.fp16.onnx"
            to_fp16(fp32, built["fp16"][g])
        if "int8" in built:
            built["int8"][g] = work / f"{g}.int8.onnx"
            _to_int8(fp32, built["int8"][g])
    return built


# -- parity -----------------------------------------------------------------------------
def _greedy(backend, feeds: dict[str, np.ndarray], prompts: list[list[int]], n_prefix: int, max_new: int,
            tok: DecoderTokenizer) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in prompts]
    stops = [frozenset({tok.eos_id})] * len(prompts)
    for tokens, _ in decode(backend, feeds, prompts, n_prefix, max_new_tokens=max_new, stop_ids=stops,
                            pad_id=tok.pad_id):
        for i, t in enumerate(tokens):
            outs[i].append(int(t))
    return [o[: o.index(tok.eos_id) + 1] if tok.eos_id in o else o for o in outs]


def token_agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[int, int, int]:
    """(agreeing positions, reference positions, identical sequences)."""
    agree = total = same = 0
    for r, g in zip(ref, got, strict=True):
        total += max(len(r), len(g))
        agree += sum(a == b for a, b in zip(r, g, strict=False))
        same += r == g
    return agree, total, same


def _random_cases(pkg: ModelPackage, pre: Preprocessor, tok: DecoderTokenizer, rng: np.random.Generator,
                  max_prompt: int) -> list[tuple[dict[str, np.ndarray], list[list[int]]]]:
    """Random features (every modality mix) and random prompts, batch 1, 4, 16."""
    text = pkg.spec.preprocessing.text
    vocab = pkg.text_encoder().vocab_size if text else 0
    cases = []
    for b in (1, 4, 16):
        feats = []
        for _ in range(b):
            present = {m: bool(rng.random() < 0.7) for m in pkg.spec.modalities}
            if not any(present.values()):
                present[pkg.spec.modalities[0]] = True
            f: dict[str, np.ndarray] = {}
            if text:
                f["input_ids"] = rng.integers(0, vocab, int(rng.integers(2, text.max_length + 1)))
            for name, shape in _float_shapes(pkg).items():
                f[name] = rng.normal(0, 1, shape).astype(np.float32)
            feats.append(Prepared(id="random", workload=pkg.spec.name, features=f, present=present))
        prompts = [[tok.bos_id, *rng.integers(0, tok.vocab_size, int(rng.integers(0, max_prompt))).tolist()]
                   for _ in range(b)]
        cases.append((pre.collate(feats), prompts))
    return cases


def _float_shapes(pkg: ModelPackage) -> dict[str, tuple[int, ...]]:
    p = pkg.spec.preprocessing
    out: dict[str, tuple[int, ...]] = {}
    if p.image:
        out["pixel_values"] = (p.image.channels, p.image.size, p.image.size)
    if p.audio:
        out["audio_features"] = (p.audio.n_mels, p.audio.frames)
    if p.tabular:
        out["tabular"] = (len(p.tabular.fields),)
    return out


def _sample_cases(pkg: ModelPackage, pre: Preprocessor, tok: DecoderTokenizer, records: list | None
                  ) -> list[tuple[dict[str, np.ndarray], list[list[int]]]]:
    """Sample records with their conversations (the sample data's dialogues
    for built-in workloads, a record's own ``messages`` otherwise)."""
    from pipeline.tooling import sample_data

    pairs: list[tuple[Prepared, list[int]]] = []
    if records is None and pkg.spec.name in sample_data.WORKLOADS:
        for s in sample_data.generate(pkg.spec.name, 48, seed=123, missing_rate=0.3):
            try:
                prepared = pre.prepare(s.record)
            except Exception:  # broken samples are simply not used
                continue
            pairs.extend((prepared, prompt_ids(tok, m)) for m, _ in sample_data.dialogues(pkg.spec.name, s.labels))
    else:
        for r in records or []:
            try:
                rec = pre.parse(r)
                pairs.append((pre.prepare(rec), prompt_ids(tok, rec.messages)))
            except Exception:
                continue
    if len(pairs) < 8:
        raise ExportError(f"only {len(pairs)} usable sample records; generation parity needs at least 8")
    return [(pre.collate([p for p, _ in pairs[i:i + 16]]), [q for _, q in pairs[i:i + 16]])
            for i in range(0, len(pairs), 16)]


def check_parity(pkg: ModelPackage, model, files: dict[str, Path], precision: str, tok: DecoderTokenizer,
                 random_cases: list, sample_cases: list) -> dict[str, Any]:
    """Greedy tokens of the ONNX graphs against PyTorch's."""
    from pipeline.tooling.model.generative import TorchBackend

    g = model.cfg.generative
    ref_backend = TorchBackend(model)
    ort = OrtBackend(files, EngineConfig(device="cpu"), io_binding=False)
    n_prefix = model.cfg.prefix_tokens
    report: dict[str, Any] = {"provider": ort.provider, "min_agreement": AGREEMENT[precision]}
    for name, cases in (("random", random_cases), ("sample", sample_cases)):
        agree = total = same = seqs = 0
        for feeds, prompts in cases:
            ref = _greedy(ref_backend, feeds, prompts, n_prefix, g.max_new_tokens, tok)
            got = _greedy(ort, feeds, prompts, n_prefix, g.max_new_tokens, tok)
            a, t, s = token_agreement(ref, got)
            agree, total, same, seqs = agree + a, total + t, same + s, seqs + len(ref)
        report[name] = {"sequences": seqs, "identical": same, "token_agreement": round(agree / max(total, 1), 5)}
    failures = []
    if precision == "fp32":
        for name in ("random", "sample"):
            r = report[name]
            if r["identical"] != r["sequences"]:
                failures.append(f"{name}: {r['sequences'] - r['identical']} of {r['sequences']} greedy "
                                "sequences differ from PyTorch")
    elif report["sample"]["token_agreement"] < AGREEMENT[precision]:
        failures.append(f"sample token agreement {report['sample']['token_agreement']:.2%} < "
                        f"{AGREEMENT[precision]:.0%}")
    report.update(passed=not failures, failures=failures)
    return report


# -- the whole export ---------------------------------------------------------------------
def export_generative(package_dir: str | Path, variants: tuple[str, ...] = ("fp32", "int8"), *,
                      sample_records: list | None = None, model: Any = None, seed: int = 0
                      ) -> tuple[ModelPackage, dict[str, Any]]:
    """Export the generative head of a package's model into ``generate/``;
    every variant passes parity or the export fails and the package is left
    as it was.  fp32 is always exported (the others derive from it)."""
    pkg = load_package(package_dir)
    unknown = set(variants) - set(SUFFIX)
    if unknown:
        raise ExportError(f"unknown variants {sorted(unknown)}; choose from {sorted(SUFFIX)}")
    if not has_generative(pkg):
        raise ExportError(f"package {pkg.name} has no generative head (train with --generative)")
    if model is None:
        from pipeline.tooling.torch_engine import load_model

        model = load_model(pkg.path("model/model.safetensors").parent)
    g = model.cfg.generative
    variants = tuple(dict.fromkeys(("fp32", *variants)))
    tok = DecoderTokenizer.load(pkg.path(TOKENIZER))
    pre = Preprocessor.for_package(pkg)
    samples = sample_prepared(pkg, sample_records, n=16)
    random_cases = _random_cases(pkg, pre, tok, np.random.default_rng(seed), min(8, g.max_prompt_tokens))
    sample_cases = _sample_cases(pkg, pre, tok, sample_records)
    work = Path(tempfile.mkdtemp(prefix="mmpipe-genexport-"))
    try:
        t0 = time.perf_counter()
        built = build_graphs(model, pre.collate(samples[:2]), work, variants)
        log_event(logger, logging.INFO, "generative_onnx_exported", seconds=round(time.perf_counter() - t0, 2),
                  opset=OPSET, variants=",".join(variants))
        report: dict[str, Any] = {"opset": OPSET, "head": g.name, "variants": {}}
        for name in variants:
            report["variants"][name] = check_parity(pkg, model, built[name], name, tok, random_cases,
                                                    sample_cases)
        print(format_report(report))
        failed = [n for n, r in report["variants"].items() if not r["passed"]]
        if failed:
            raise ExportError(f"generation parity failed for {', '.join(failed)}: " + "; ".join(
                f for n in failed for f in report["variants"][n]["failures"]))
        _install(pkg, model, built, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_package(pkg.root), report


def _install(pkg: ModelPackage, model, built: dict[str, dict[str, Path]], report: dict[str, Any]) -> None:
    """Files first, then the manifest (atomic)."""
    g = model.cfg.generative
    (pkg.root / "generate").mkdir(exist_ok=True)
    shutil.copyfile(pkg.path(TOKENIZER), pkg.root / PACKAGE_TOKENIZER)
    manifest = pkg.manifest
    manifest.files[PACKAGE_TOKENIZER] = ""
    for name, graphs in built.items():
        rels = {gname: f"generate/{gname}{SUFFIX[name]}.onnx" for gname in graphs}
        for gname, rel in rels.items():
            shutil.copyfile(graphs[gname], pkg.root / rel)
            manifest.files[rel] = ""
        manifest.variants[f"generate-{name}"] = Variant(
            engine="onnxruntime", files=[*rels.values(), PACKAGE_TOKENIZER], precision=name, opset=OPSET,
            head=g.name, graphs=rels, tokenizer=PACKAGE_TOKENIZER, prefix_tokens=model.cfg.prefix_tokens,
            n_layer=g.n_layer, n_head=g.n_head, n_embd=g.n_embd, vocab_size=g.vocab_size,
            max_prompt_tokens=g.max_prompt_tokens, max_new_tokens=g.max_new_tokens,
            quantization="dynamic" if name == "int8" else None,
        )
    manifest.parity = {**(manifest.parity or {}), "generation": report}
    write_manifest(pkg.root, manifest)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"generation parity ({report['head']}, greedy tokens vs PyTorch):"]
    for name, r in report["variants"].items():
        status = "ok" if r["passed"] else "FAILED"
        lines.append(
            f"  {name:<5} {status:<6} random: {r['random']['identical']}/{r['random']['sequences']} identical, "
            f"sample: {r['sample']['identical']}/{r['sample']['sequences']} identical, "
            f"token agreement {r['sample']['token_agreement']:.2%}")
    return "\n".join(lines)
