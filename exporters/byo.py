"""Bring your own model: three ways in, one model package out.

1. **A PyTorch module** of the user's own (``package.module:Class`` or a
   factory function, constructor arguments, a safetensors state dict) and a
   signature file: exported to ONNX by mmpipe with the same parity check and
   variants as its own fusion family (``exporters.onnx_export``).
2. **A Hugging Face checkpoint directory** whose class ``transformers``
   knows (``architectures`` in its config.json), loaded from local files
   only, and a signature file: exported like a module.  Classification
   classes give their ``logits`` (or the field an output names with
   ``from``); dual encoders (CLIP, VisionTextDualEncoder...) score each
   record against one text prompt per label (``prompts``), on the
   modalities it has (a presence input is added when the signature has
   none).
3. **An ONNX file** exported elsewhere and a signature file: the graph must
   match the signature (names, dtypes, ranks, static dims), its outputs must
   have the signature's shapes on real inputs; it is packaged as is.

Every way writes the package that every path already serves: manifest
(workload spec and signature from the signature file, ``source``), the
tokenizer, the ONNX variants, sha256 of each file and the parity report.
The user's model code is never copied into the package: serving needs only
ONNX Runtime.

Errors a user will hit say what is wrong in their terms: a module that
cannot be imported, weights that do not fit the module (missing, unexpected
and mis-shaped keys listed), an operator the exporter cannot handle (which,
at which opset), outputs whose shapes disagree with the signature, a graph
whose inputs differ from the signature (which input, how), a tokenizer that
would give a record without text no tokens at all.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporters import parity
from exporters.onnx_export import OPSET, ExportError, export_package, fixed_length_warning
from pipeline.errors import PackageError
from pipeline.log import log_event
from pipeline.package import Manifest, ModelPackage, Variant, load_package, publish, write_manifest
from pipeline.signature import InputDecl, SignatureFile, load_signature
from pipeline.tokenizer import TOKENIZER_FILE

logger = logging.getLogger(__name__)

ONNX_REL = "onnx/model.onnx"


class ByoError(PackageError):
    """A brought model cannot be packaged; the message says why and what to do."""


# -- importing the user's code --------------------------------------------------------------------------
def import_object(target: str, search_path: Sequence[str | Path] = ()) -> Any:
    """``package.module:Name`` -> the object (a class or a factory function).

    The current directory and ``search_path`` are importable, like
    ``python -m`` would make them."""
    if target.count(":") != 1 or not all(target.split(":")):
        raise ByoError(f"--module {target!r} must look like package.module:ClassOrFunction")
    mod_name, attr = target.split(":")
    for p in [*search_path, os.getcwd()]:
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or mod_name
        if mod_name == missing or mod_name.startswith(missing + "."):
            raise ByoError(
                f"cannot import module {mod_name!r}: no module named {missing!r} on the Python path (searched the "
                f"current directory{', ' + ', '.join(map(str, search_path)) if search_path else ''} and "
                "site-packages); run from the directory that holds it, pass --module-path DIR, or install it"
            ) from None
        raise ByoError(f"cannot import module {mod_name!r}: it imports {missing!r}, which is not installed "
                       f"(pip install it in this environment)") from None
    except Exception as exc:
        raise ByoError(f"importing module {mod_name!r} failed: {type(exc).__name__}: {exc}"
                       f"{_user_frame(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                            and getattr(v, "__module__", None) == module.__name__)
            raise ByoError(f"module {mod_name!r} has no {attr!r}; it defines {public or 'no public callables'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ByoError(f"{target} is a {type(obj).__name__}, not a class or factory function")
    return obj


def _user_frame(exc: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame of the failure, if any."""
    tb = traceback.extract_tb(exc.__traceback__)
    return f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def parse_init_args(value: str | None) -> dict[str, Any]:
    """``--init-args``: a JSON object, or ``@file.json``."""
    if not value:
        return {}
    origin = "--init-args"
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise ByoError(f"--init-args file not found: {path}")
        value, origin = path.read_text(), str(path)
    try:
        args = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ByoError(f"{origin} is not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ByoError(f"{origin} must be a JSON object of keyword arguments, got {type(args).__name__}")
    return args


def build_module(factory: Any, init_args: dict[str, Any], target: str) -> Any:
    """Call the class or factory with the keyword arguments; an nn.Module out."""
    from torch import nn

    try:
        module = factory(**init_args)
    except TypeError as exc:
        raise ByoError(f"cannot construct {target} with --init-args {json.dumps(init_args)[:300]}: {exc}") from None
    except Exception as exc:
        raise ByoError(f"constructing {target} failed: {type(exc).__name__}: {exc}{_user_frame(exc)}") from None
    if not isinstance(module, nn.Module):
        raise ByoError(f"{target} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def load_weights(module: Any, weights: str | Path) -> None:
    """Load a safetensors state dict, strictly: every key of the module
    present with its shape, nothing left over.  The message lists what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise ByoError(f"weights file not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ByoError(f"{path} is not a safetensors file ({exc}); save weights with "
                       "safetensors.torch.save_file(model.state_dict(), PATH)") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in the module"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")

        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {listing(shapes)}")
        raise ByoError(f"weights {path.name} do not match the module: " + "; ".join(parts)
                       + ". Were they saved from this class with these --init-args?")
    module.load_state_dict(state, strict=True)


# -- adapters: the user's model behind the interface the exporter uses -----------------------------------
def _as_outputs(result: Any, names: list[str]) -> list[Any]:
    """A forward's return value (tensor, tuple/list, dict, ModelOutput) as the
    tensors the signature names, in its order."""
    import torch

    if isinstance(result, torch.Tensor):
        found = [result]
    elif isinstance(result, dict) or hasattr(result, "keys"):
        missing = [n for n in names if n not in result]
        if missing:
            raise ByoError(f"the model's forward returned keys {list(result.keys())}; the signature's outputs "
                           f"{missing} are not among them")
        return [result[n] for n in names]
    elif isinstance(result, (tuple, list)):
        found = list(result)
    else:
        raise ByoError(f"the model's forward returned a {type(result).__name__}; return a tensor, a tuple of "
                       "tensors in the signature's output order, or a dict by output name")
    if len(found) != len(names):
        raise ByoError(f"the model's forward returned {len(found)} tensors; the signature has {len(names)} "
                       f"outputs {names}")
    return found


def _adapter_base() -> type:
    from torch import nn

    class _Adapter(nn.Module):
        """Inputs in signature order in, outputs in signature order out,
        plus ``run(feeds) -> dict`` (what the exporter and parity use)."""

        def __init__(self, sig: SignatureFile) -> None:
            super().__init__()
            self.input_names = [i.name for i in sig.inputs]
            self.output_names = [o.name for o in sig.outputs]

        def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
            import torch

            args = [torch.as_tensor(np.ascontiguousarray(feeds[n])) for n in self.input_names]
            return dict(zip(self.output_names, self(*args), strict=True))

    return _Adapter


def module_adapter(module: Any, sig: SignatureFile) -> Any:
    """The user's module called with the inputs as keyword arguments."""

    class ModuleAdapter(_adapter_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(sig)
            self.inner = module

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = self.inner(**dict(zip(self.input_names, args, strict=True)))
            return tuple(_as_outputs(out, self.output_names))

    return ModuleAdapter().eval()


def hf_adapter(model: Any, sig: SignatureFile, prompt_ids: dict[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    """A transformers model behind the signature.  Outputs with ``prompts``
    score the record (its image and text embeddings, averaged over the
    modalities present, L2-normalised) against each label's prompt embedding,
    times the model's logit scale: CLIP-style zero-shot tagging.  Others read
    the model output field ``from`` (default ``logits``)."""
    import torch

    feats = {i.full_feature: i.name for i in sig.inputs}

    class HFAdapter(_adapter_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(sig)
            self.model = model
            self.fields = {o.name: o.from_ or "logits" for o in sig.outputs if not o.prompts}
            self.zero_shot = [o.name for o in sig.outputs if o.prompts]
            if self.zero_shot:
                with torch.no_grad():
                    for o in sig.outputs:
                        if o.prompts:
                            ids, mask = prompt_ids[o.name]
                            emb = model.get_text_features(input_ids=torch.as_tensor(ids),
                                                          attention_mask=torch.as_tensor(mask))
                            emb = _embeds(emb)
                            self.register_buffer(f"labels_{o.name}", emb / emb.norm(dim=-1, keepdim=True))

        def forward(self, *args: Any) -> tuple[Any, ...]:
            by_name = dict(zip(self.input_names, args, strict=True))
            hf_kwargs = {k: by_name[v] for k, v in (
                ("input_ids", feats.get("text.input_ids")), ("attention_mask", feats.get("text.attention_mask")),
                ("token_type_ids", feats.get("text.token_type_ids")),
                ("pixel_values", feats.get("image.pixel_values"))) if v is not None}
            out: dict[str, Any] = {}
            if self.fields:
                res = self.model(**hf_kwargs)
                for name, field in self.fields.items():
                    out[name] = getattr(res, field)
            if self.zero_shot:
                out.update(self._zero_shot(hf_kwargs, by_name.get(feats.get("presence", ""))))
            return tuple(out[n] for n in self.output_names)

        def _zero_shot(self, kw: dict[str, Any], presence: Any) -> dict[str, Any]:
            parts = []
            if "pixel_values" in kw:
                e = _embeds(self.model.get_image_features(pixel_values=kw["pixel_values"]))
                parts.append(("image", e / e.norm(dim=-1, keepdim=True)))
            if "input_ids" in kw:
                e = _embeds(self.model.get_text_features(input_ids=kw["input_ids"],
                                                         attention_mask=kw.get("attention_mask")))
                parts.append(("text", e / e.norm(dim=-1, keepdim=True)))
            mods = sig.modalities()
            total = 0
            for m, e in parts:
                w = presence[:, mods.index(m)].unsqueeze(-1).to(e.dtype) if presence is not None else 1.0
                total = total + w * e
            rec = total / total.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            scale = self.model.logit_scale.exp() if hasattr(self.model, "logit_scale") else 1.0
            return {n: scale * rec @ getattr(self, f"labels_{n}").T for n in self.zero_shot}

    return HFAdapter().eval()


def _embeds(x: Any) -> Any:
    """``get_*_features`` return a tensor, or (newer transformers) an output
    whose ``pooler_output`` is the projected embedding."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    for field in ("text_embeds", "image_embeds", "pooler_output"):
        v = getattr(x, field, None)
        if isinstance(v, torch.Tensor):
            return v
    raise ByoError(f"cannot find the embedding in {type(x).__name__} returned by get_*_features")


# -- checks -------------------------------------------------------------------------------------------------
def check_output_shapes(sig: SignatureFile, outputs: dict[str, Any], batch: int, seq: int | None,
                        what: str) -> None:
    """Each output has the signature's shape (batch, sequence, labels) on a
    real call; the message names the output and both shapes."""
    problems = []
    for o in sig.outputs:
        if o.name not in outputs:
            problems.append(f"output {o.name!r} is missing")
            continue
        got = list(np.shape(outputs[o.name]))
        want = list(o.shape or [])
        dims = [batch if d == "batch" else seq if d == "sequence" else d for d in want]
        ok = len(got) == len(dims) and all(not isinstance(d, int) or g == d for g, d in zip(got, dims, strict=True))
        if not ok:
            problems.append(f"output {o.name!r} has shape {got} for a batch of {batch}, but the signature says "
                            f"{want} ({len(o.labels)} labels of head {o.head_name!r})")
    if problems:
        raise ByoError(f"{what} does not give what the signature describes: " + "; ".join(problems))


def _probe(sig: SignatureFile, vocab: int, batch: int = 3, seq: int = 7) -> tuple[dict[str, np.ndarray], int | None]:
    """Random inputs in the signature's shapes (for the output-shape check)."""
    s = sig.signature()
    has_seq = any("sequence" in i.shape for i in s.inputs)
    feeds = parity.random_feeds(s.model_dump(), batch, seq, vocab, len(sig.modalities()), np.random.default_rng(0))
    return feeds, seq if has_seq else None


def graph_mismatches(session: Any, sig: SignatureFile) -> list[str]:
    """How an ONNX graph differs from a signature: names, dtypes, ranks (as
    the engine checks at load) and static dims."""
    from pipeline.engines.onnx_engine import signature_mismatches

    s = sig.signature().model_dump()
    problems = signature_mismatches(session, s)
    for kind, have, want in (("input", session.get_inputs(), s["inputs"]), ("output", session.get_outputs(),
                                                                              s["outputs"])):
        got = {t.name: t for t in have}
        for spec in want:
            t = got.get(spec["name"])
            if t is None or len(t.shape) != len(spec["shape"]):
                continue
            for i, (g, w) in enumerate(zip(t.shape, spec["shape"], strict=True)):
                if isinstance(g, int) and isinstance(w, int) and g != w:
                    problems.append(f"{kind} {spec['name']!r} dim {i} is {g} in the graph, {w} in the signature "
                                    f"(graph shape {list(t.shape)}, signature {spec['shape']})")
                elif isinstance(g, int) and isinstance(w, str) and w in ("batch", "sequence") and kind == "input":
                    problems.append(f"{kind} {spec['name']!r} dim {i} ({w}) is fixed to {g} in the graph; export "
                                    "it with a dynamic axis")
    return problems


def check_empty_text(sig: SignatureFile, tokenizer_file: Path) -> None:
    """A record without text is valid for a model that also takes another
    modality; it reaches the model as the tokenizer's encoding of "".  A
    tokenizer that adds no special tokens gives none at all, and a batch of
    such records would be a sequence of length 0, which no model can run
    (unless every batch is padded to max_length anyway)."""
    from tokenizers import Tokenizer

    others = [m for m in sig.modalities() if m != "text"]
    if "text" not in sig.modalities() or not others or sig.signature().needs_fixed_length:
        return
    if Tokenizer.from_file(str(tokenizer_file)).encode("").ids:
        return
    raise ByoError(
        f"the tokenizer {tokenizer_file} turns an empty text into no tokens at all (it adds no [CLS]/[SEP] or "
        f"other special tokens), so a record without text, which this model takes (it also takes "
        f"{', '.join(others)}), would reach it as a sequence of length 0. Give the tokenizer a post-processor "
        "that adds them (e.g. tokenizers.processors.TemplateProcessing(single='[CLS] $A [SEP]', "
        "special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])), save it again and train with it")


# -- the package ---------------------------------------------------------------------------------------------
def _read_samples(samples: str | Path | None) -> list[bytes] | None:
    if samples is None:
        return None
    p = Path(samples)
    if not p.is_file():
        raise ByoError(f"--samples file not found: {p}")
    with p.open("rb") as fh:
        return [line.rstrip(b"\r\n") for line in fh if line.strip()]


def _staging(sig: SignatureFile, out: Path, *, name: str | None, version: str, source: dict[str, Any],
             overwrite: bool, tokenizer_dir: Path | None) -> Path:
    """A temporary sibling of ``out`` with the manifest and tokenizer (no
    variants yet)."""
    if out.exists() and not overwrite:
        raise ByoError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    files: list[str] = []
    if "text" in sig.modalities():
        src = tokenizer_dir
        if src is None or not (src / TOKENIZER_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ByoError(
                f"the text input needs a tokenizer: {src or 'no directory given'} has no {TOKENIZER_FILE} (set "
                "preprocessing.tokenizer on the text input to a directory with a fast tokenizer's tokenizer.json, "
                "e.g. from tokenizer.save_pretrained(DIR))")
        try:
            check_empty_text(sig, src / TOKENIZER_FILE)
        except ByoError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "tokenizer").mkdir()
        shutil.copyfile(src / TOKENIZER_FILE, tmp / "tokenizer" / TOKENIZER_FILE)
        files.append(f"tokenizer/{TOKENIZER_FILE}")
    manifest = Manifest(name=name or sig.name or f"{sig.workload}-model", version=version,
                        workload=sig.workload_spec(), signature=sig.signature(), variants={},
                        files={rel: "" for rel in files}, source=source)
    write_manifest(tmp, manifest)
    return tmp


def _publish(tmp: Path, out: Path) -> ModelPackage:
    publish(tmp, out)
    return load_package(out)


def _vocab(tmp: Path, sig: SignatureFile) -> int:
    if "text" not in sig.modalities():
        return 0
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(tmp / "tokenizer" / TOKENIZER_FILE)).get_vocab_size())


def _export_torch(adapter: Any, sig: SignatureFile, tmp: Path, out: Path, variants: tuple[str, ...],
                  samples: list[bytes] | None, what: str) -> tuple[ModelPackage, dict[str, Any]]:
    """Shape check, then the family's export (ONNX, variants, parity) into
    the staging package, then publish it."""
    import torch

    if samples is None:
        raise ByoError("the parity check needs sample records of this model's workload: pass --samples "
                       "records.jsonl (at least 8 records, one JSON per line)")
    feeds, seq = _probe(sig, _vocab(tmp, sig))
    try:
        with torch.inference_mode():
            got = {k: v.numpy() for k, v in adapter.run(feeds).items()}
    except ByoError:
        raise
    except Exception as exc:
        raise ByoError(f"{what} failed on inputs shaped as the signature says "
                       f"({', '.join(f'{k} {list(v.shape)} {v.dtype}' for k, v in feeds.items())}): "
                       f"{type(exc).__name__}: {exc}{_user_frame(exc)}") from None
    check_output_shapes(sig, got, 3, seq, what)
    pkg, report = export_package(tmp, variants, sample_records=samples, model=adapter)
    return _publish(pkg.root, out), report


def package_module(target: str, signature: str | Path, out: str | Path, *, weights: str | Path,
                   init_args: dict[str, Any] | None = None, name: str | None = None, version: str = "1",
                   samples: str | Path | None = None, variants: tuple[str, ...] = ("fp32",),
                   overwrite: bool = False, search_path: Sequence[str | Path] = ()) -> ModelPackage:
    """Way 1: the user's PyTorch module -> ONNX -> package (see module docstring)."""
    sig = load_signature(signature)
    factory = import_object(target, search_path)
    module = build_module(factory, init_args or {}, target)
    load_weights(module, weights)
    module.eval()
    adapter = module_adapter(module, sig)
    out = Path(out)
    source = {"kind": "module", "module": target, "init_args": init_args or {}, "weights": Path(weights).name}
    tmp = _staging(sig, out, name=name, version=version, source=source, overwrite=overwrite,
                   tokenizer_dir=sig.tokenizer_dir())
    try:
        pkg, _ = _export_torch(adapter, sig, tmp, out, variants, _read_samples(samples), f"module {target}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_event(logger, logging.INFO, "byo_packaged", kind="module", model=pkg.name, variants=",".join(
        pkg.manifest.variants))
    return pkg


def load_hf(hf_dir: str | Path) -> Any:
    """The checkpoint's model class (``architectures`` in config.json) from
    local files only."""
    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ByoError(f"{d} is not a Hugging Face checkpoint directory: config.json is missing")
    cfg = json.loads(cfg_path.read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        raise ByoError(f"{cfg_path} names no model class ('architectures'); save the model with save_pretrained")
    import transformers

    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise ByoError(f"transformers {transformers.__version__} has no class {archs[0]!r} (from {cfg_path}); "
                       "upgrade transformers or package the model as a module (--module)")
    try:
        model = cls.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:
        raise ByoError(f"loading {archs[0]} from {d} failed: {type(exc).__name__}: {str(exc)[:500]}") from None
    return model.eval()


def _prompt_ids(sig: SignatureFile, tokenizer_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from pipeline.tokenizer import TextEncoder

    text = sig.workload_spec().preprocessing.text
    enc = TextEncoder.load(tokenizer_dir, text.max_length if text else 64)
    out = {}
    for o in sig.outputs:
        if o.prompts:
            rows = [enc.encode(p).ids for p in o.prompts]
            n = max(len(r) for r in rows)
            ids = np.full((len(rows), n), enc.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), n), dtype=np.int64)
            for i, r in enumerate(rows):
                ids[i, : len(r)], mask[i, : len(r)] = r, 1
            out[o.name] = (ids, mask)
    return out


PRESENCE_INPUT = "presence"


def with_zero_shot_presence(sig: SignatureFile) -> SignatureFile:
    """A zero-shot dual encoder (outputs with ``prompts``) over text and
    image needs to know which of them a record has: without it, an
    image-only record's embedding would be averaged with the empty text's.
    When the signature declares no presence input, one is added (it is what
    every path's Preprocessor computes anyway) and the manifest lists it."""
    if not any(o.prompts for o in sig.outputs) or len(sig.modalities()) < 2:
        return sig
    if any(i.modality == "presence" for i in sig.inputs):
        return sig
    taken = {i.name for i in sig.inputs}
    name = next(n for n in (PRESENCE_INPUT, *(f"{PRESENCE_INPUT}_{k}" for k in range(1, 100))) if n not in taken)
    presence = InputDecl(name=name, modality="presence", dtype="float32", shape=["batch", len(sig.modalities())])
    log_event(logger, logging.INFO, "zero_shot_presence_added", input=name, modalities=",".join(sig.modalities()))
    return sig.model_copy(update={"inputs": [*sig.inputs, presence]})


def package_hf(hf_dir: str | Path, signature: str | Path, out: str | Path, *, name: str | None = None,
               version: str = "1", samples: str | Path | None = None, variants: tuple[str, ...] = ("fp32",),
               overwrite: bool = False) -> ModelPackage:
    """Way 2: a Hugging Face checkpoint directory -> ONNX -> package."""
    sig = load_signature(signature)
    model = load_hf(hf_dir)
    tok_dir = sig.tokenizer_dir() or Path(hf_dir)
    if any(o.prompts for o in sig.outputs):
        if not (hasattr(model, "get_text_features") and hasattr(model, "get_image_features")):
            raise ByoError(f"outputs with prompts need a dual encoder (get_text_features and get_image_features); "
                           f"{type(model).__name__} has neither")
        if not (tok_dir / TOKENIZER_FILE).is_file():
            raise ByoError(f"prompts need the checkpoint's tokenizer: {tok_dir} has no {TOKENIZER_FILE}")
    sig = with_zero_shot_presence(sig)
    adapter = hf_adapter(model, sig, _prompt_ids(sig, tok_dir) if any(o.prompts for o in sig.outputs) else {})
    out = Path(out)
    source = {"kind": "hf", "class": type(model).__name__, "dir": Path(hf_dir).name}
    tmp = _staging(sig, out, name=name, version=version, source=source, overwrite=overwrite,
                   tokenizer_dir=tok_dir if "text" in sig.modalities() else None)
    try:
        pkg, _ = _export_torch(adapter, sig, tmp, out, variants, _read_samples(samples), type(model).__name__)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_event(logger, logging.INFO, "byo_packaged", kind="hf", model=pkg.name, variants=",".join(
        pkg.manifest.variants))
    return pkg


def package_onnx(onnx_file: str | Path, signature: str | Path, out: str | Path, *, name: str | None = None,
                 version: str = "1", overwrite: bool = False) -> ModelPackage:
    """Way 3: an ONNX file exported elsewhere, checked against the signature
    and packaged as is (variant ``onnx-fp32``; there is no PyTorch reference
    to check parity against, so the report records the checks made)."""
    import onnx
    import onnxruntime as ort

    src = Path(onnx_file)
    sig = load_signature(signature)
    if not src.is_file():
        raise ByoError(f"ONNX file not found: {src}")
    try:
        onnx.checker.check_model(str(src))
        opset = max((o.version for o in onnx.load(str(src), load_external_data=False).opset_import
                     if o.domain in ("", "ai.onnx")), default=None)
        session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ByoError(f"{src} is not an ONNX model ONNX Runtime can load: {type(exc).__name__}: "
                       f"{str(exc)[:400]}") from None
    problems = graph_mismatches(session, sig)
    if problems:
        raise ByoError(f"ONNX model {src.name} does not match the signature {Path(signature).name}: "
                       + "; ".join(problems))
    out = Path(out)
    source = {"kind": "onnx", "file": src.name, "opset": opset}
    tmp = _staging(sig, out, name=name, version=version, source=source, overwrite=overwrite,
                   tokenizer_dir=sig.tokenizer_dir())
    try:
        feeds, seq = _probe(sig, _vocab(tmp, sig))
        try:
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        except Exception as exc:
            raise ByoError(f"ONNX model {src.name} failed on inputs shaped as the signature says: "
                           f"{type(exc).__name__}: {str(exc)[:400]}") from None
        check_output_shapes(sig, got, 3, seq, f"ONNX model {src.name}")
        warning = fixed_length_warning(load_package(tmp))
        if warning:
            print(f"warning: {warning}")
            log_event(logger, logging.WARNING, "model_without_attention_mask", model=sig.name or sig.workload)
        (tmp / "onnx").mkdir()
        shutil.copyfile(src, tmp / ONNX_REL)
        pkg = load_package(tmp)
        manifest = pkg.manifest
        manifest.files[ONNX_REL] = ""
        manifest.variants["onnx-fp32"] = Variant(engine="onnxruntime", files=[ONNX_REL], precision="fp32",
                                                 opset=opset, quantization=None)
        manifest.parity = {"reference": None, "checked": ["graph matches the signature (names, dtypes, ranks, "
                                                          "static dims)", "output shapes on a probe batch"],
                           "opset": opset, "warnings": [warning] if warning else []}
        write_manifest(tmp, manifest)
        result = _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log_event(logger, logging.INFO, "byo_packaged", kind="onnx", model=result.name)
    return result


__all__ = ["OPSET", "ByoError", "ExportError", "package_hf", "package_module", "package_onnx"]
