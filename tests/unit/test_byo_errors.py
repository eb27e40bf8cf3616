"""Errors a user bringing a model hits, each explained: a module that cannot
be imported, weights that do not fit it, an operator the exporter cannot
handle, outputs whose shapes disagree with the signature, an ONNX graph that
differs from the signature, a signature file that is wrong."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from safetensors.torch import save_file  # noqa: E402

from exporters import byo  # noqa: E402
from exporters.onnx_export import ExportError  # noqa: E402
from pipeline.errors import ConfigError, PackageError  # noqa: E402
from pipeline.signature import load_signature  # noqa: E402

USER_CODE = '''
import torch
from torch import nn


class Tagger(nn.Module):
    """image -> 3 category logits (and, with bad_op, an op ONNX lacks)."""

    def __init__(self, n_out: int = 3, bad_op: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, n_out)
        self.bad_op = bad_op

    def forward(self, image):
        x = self.conv(image).mean(dim=(2, 3))
        if self.bad_op:
            x = torch.special.erfcx(x)
        return self.head(x)


class TextTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def make_tagger(**kw):
    return Tagger(**kw)


class TextImageTagger(nn.Module):
    """token ids (+ mask) and an image -> 3 category logits."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(2000, 4)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, mask, image):
        m = mask.unsqueeze(-1).float()
        x = self.emb(ids).view(ids.shape[0], -1, 2, 2).flatten(2)  # split into heads, as attention layers do
        text = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(torch.cat([text, self.conv(image).mean(dim=(2, 3))], dim=-1))
'''


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's project: their module, a signature, sample records."""
    (tmp_path / "usermodels").mkdir()
    (tmp_path / "usermodels" / "__init__.py").write_text("")
    (tmp_path / "usermodels" / "tagger.py").write_text(USER_CODE)
    (tmp_path / "usermodels" / "broken.py").write_text("import torch\nraise RuntimeError('config missing')\n")
    (tmp_path / "usermodels" / "needs_dep.py").write_text("import surely_not_installed_pkg\n")
    sig = {"workload": "shop", "inputs": [{"name": "image", "modality": "image", "shape": ["batch", 3, 16, 16],
                                           "preprocessing": {"size": 16}}],
           "outputs": [{"name": "category", "type": "multiclass", "labels": ["a", "b", "c"]}]}
    (tmp_path / "sig.yaml").write_text(yaml.safe_dump(sig))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for mod in [m for m in sys.modules if m.startswith("usermodels")]:
        monkeypatch.delitem(sys.modules, mod)
    return tmp_path


def weights_for(user: Path, **kw: object) -> Path:
    sys.path.insert(0, str(user))
    from usermodels.tagger import Tagger

    torch.manual_seed(0)
    path = user / f"w{len(kw)}.safetensors"
    save_file(Tagger(**kw).state_dict(), str(path))  # type: ignore[arg-type]
    return path


def samples(user: Path, n: int = 10) -> Path:
    import base64

    from pipeline.tooling.sample_data import generate
    lines = []
    for s in generate("retail", n, seed=1, missing_rate=0.0):
        lines.append(json.dumps({"id": s.record["id"], "workload": "shop",
                                 "image": base64.b64encode(s.record["image"]).decode()}))
    path = user / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- importing ------------------------------------------------------------------------------------------
def test_module_not_found(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"cannot import module 'nowhere\.tagger': no module named 'nowhere'.*"
                                           r"--module-path"):
        byo.import_object("nowhere.tagger:Tagger")


def test_module_imports_a_missing_dependency(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"it imports 'surely_not_installed_pkg', which is not installed"):
        byo.import_object("usermodels.needs_dep:X")


def test_module_raises_on_import(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"importing module 'usermodels\.broken' failed: RuntimeError: config "
                                           r"missing \(at .*broken\.py:2\)"):
        byo.import_object("usermodels.broken:X")


def test_attribute_missing_lists_what_is_there(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"has no 'Tagr'; it defines \['Tagger', 'TextImageTagger', 'TextTagger', "
                                           r"'make_tagger'\]"):
        byo.import_object("usermodels.tagger:Tagr")


def test_bad_import_path_syntax(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"must look like package\.module:ClassOrFunction"):
        byo.import_object("usermodels.tagger.Tagger")


def test_bad_init_args(user: Path) -> None:
    factory = byo.import_object("usermodels.tagger:make_tagger")
    with pytest.raises(byo.ByoError, match=r"cannot construct usermodels.tagger:make_tagger with --init-args "
                                           r"\{\"widht\": 3\}: .*unexpected keyword argument 'widht'"):
        byo.build_module(factory, {"widht": 3}, "usermodels.tagger:make_tagger")
    with pytest.raises(byo.ByoError, match="is not valid JSON"):
        byo.parse_init_args("{n_out: 3}")
    with pytest.raises(byo.ByoError, match="must be a JSON object"):
        byo.parse_init_args("[3]")


# -- weights -----------------------------------------------------------------------------------------------
def test_weights_missing_and_unexpected_keys_listed(user: Path) -> None:
    path = weights_for(user)
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["extra.weight"] = state.pop("head.bias")
    save_file(state, str(user / "renamed.safetensors"))
    with pytest.raises(byo.ByoError) as err:
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg",
                           weights=user / "renamed.safetensors", samples=samples(user))
    msg = str(err.value)
    assert "missing keys (1): head.bias" in msg and "unexpected keys (1): extra.weight" in msg
    assert not (user / "pkg").exists()


def test_weights_shape_mismatch_listed(user: Path) -> None:
    path = weights_for(user, n_out=5)
    with pytest.raises(byo.ByoError, match=r"shape mismatches \(2\): head\.bias \[5\] in the file, \[3\] in the "
                                           r"module, head\.weight \[5, 4\] in the file, \[3, 4\] in the module"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=path,
                           samples=samples(user))


def test_weights_not_safetensors(user: Path) -> None:
    (user / "w.pt").write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(byo.ByoError, match=r"w\.pt is not a safetensors file"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=user / "w.pt")


# -- export ------------------------------------------------------------------------------------------------------
def test_unsupported_operator_named_with_opset(user: Path) -> None:
    path = weights_for(user, bad_op=True)
    with pytest.raises(ExportError, match=r"cannot handle operator aten::special_erfcx at opset 17"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=path,
                           init_args={"bad_op": True}, samples=samples(user))
    assert not (user / "pkg").exists() and not list(user.glob(".pkg.*"))


def test_output_shape_disagrees_with_signature(user: Path) -> None:
    path = weights_for(user, n_out=5)
    with pytest.raises(byo.ByoError, match=r"output 'category' has shape \[3, 5\] for a batch of 3, but the "
                                           r"signature says \['batch', 3\] \(3 labels of head 'category'\)"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=path,
                           init_args={"n_out": 5}, samples=samples(user))


def test_parity_needs_samples(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"pass --samples"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=weights_for(user))


def test_module_way_works_here(user: Path) -> None:
    """The same fixture packages fine when nothing is wrong (the errors above
    are the errors, not the fixture)."""
    pkg = byo.package_module("usermodels.tagger:make_tagger", user / "sig.yaml", user / "pkg",
                             weights=weights_for(user), samples=samples(user))
    assert pkg.manifest.parity["variants"]["fp32"]["passed"]  # type: ignore[index]
    assert pkg.manifest.signature.inputs[0].feature == "image.pixel_values"


# -- ONNX files --------------------------------------------------------------------------------------------------------
def _export(user: Path, shape: tuple[int, ...], name: str = "image", n_out: int = 3, dtype: str = "float32") -> Path:
    """The user's Tagger exported to ONNX "elsewhere"."""
    sys.path.insert(0, str(user))
    from usermodels.tagger import Tagger

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = Tagger(n_out=n_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.t(x.float().reshape(x.shape[0], 3, 16, 16) if x.dim() == 3 else x.float())

    path = user / f"m-{name}-{len(shape)}-{n_out}-{dtype}.onnx"
    torch.onnx.export(M().eval(), (torch.zeros(*shape, dtype=getattr(torch, dtype)),), str(path),
                      input_names=[name], output_names=["category"], opset_version=17, dynamo=False,
                      dynamic_axes={name: {0: "batch"}, "category": {0: "batch"}})
    return path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"shape": (2, 3, 16, 16), "name": "pixels"},
     r"input 'image' is missing from the graph; graph has unexpected input 'pixels'"),
    ({"shape": (2, 3, 16, 16), "dtype": "float64"}, r"input 'image' has dtype tensor\(double\), expected float32"),
    ({"shape": (2, 48, 16)}, r"input 'image' has rank 3 \['batch', 48, 16\], expected rank 4"),
    ({"shape": (2, 3, 32, 32)}, r"input 'image' dim 2 is 32 in the graph, 16 in the signature"),
])
def test_onnx_graph_mismatch_says_which_input_and_how(user: Path, kwargs: dict, message: str) -> None:
    path = _export(user, **kwargs)
    with pytest.raises(byo.ByoError, match=r"does not match the signature sig\.yaml: .*" + message):
        byo.package_onnx(path, user / "sig.yaml", user / "pkg")
    assert not (user / "pkg").exists()


def test_onnx_outputs_disagree_with_signature(user: Path) -> None:
    with pytest.raises(byo.ByoError, match=r"output 'category' dim 1 is 4 in the graph, 3 in the signature"):
        byo.package_onnx(_export(user, (2, 3, 16, 16), n_out=4), user / "sig.yaml", user / "pkg")
    # dims ONNX Runtime cannot infer are checked on a real run, with the same words as for modules
    sig = load_signature(user / "sig.yaml")
    with pytest.raises(byo.ByoError, match=r"ONNX model m\.onnx does not give what the signature describes: "
                                           r"output 'category' has shape \[3, 4\] for a batch of 3"):
        byo.check_output_shapes(sig, {"category": np.zeros((3, 4))}, 3, None, "ONNX model m.onnx")
    byo.check_output_shapes(sig, {"category": np.zeros((3, 3))}, 3, None, "ONNX model m.onnx")


def test_not_an_onnx_file(user: Path) -> None:
    (user / "x.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(byo.ByoError, match=r"is not an ONNX model ONNX Runtime can load"):
        byo.package_onnx(user / "x.onnx", user / "sig.yaml", user / "pkg")


def test_onnx_way_ok_and_feeds_cast(user: Path) -> None:
    pkg = byo.package_onnx(_export(user, (2, 3, 16, 16)), user / "sig.yaml", user / "pkg")
    from pipeline.config import EngineConfig
    from pipeline.engines import create_engine
    from pipeline.predictor import Predictor

    pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")))
    res = pred.predict([line for line in samples(user, 3).read_text().splitlines()])
    assert all(r.error is None and r.heads["category"].labels for r in res)  # type: ignore[index]
    assert pkg.manifest.source == {"kind": "onnx", "file": "m-image-4-3-float32.onnx", "opset": 17}


# -- the signature file ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["inputs"][0].update(modality="smell"), r"inputs\.0\.modality"),
    (lambda s: s["inputs"][0].update(shape=[1, 3, 16, 16]), r"first dim must be 'batch'"),
    (lambda s: s["inputs"][0].update(shape=["batch", 3, 32, 32]),
     r"input 'image': shape \['batch', 3, 32, 32\] does not match its preprocessing, which gives "
     r"\['batch', 3, 16, 16\]"),
    (lambda s: s["outputs"][0].update(shape=["batch", 4]), r"last dim 4 must be the number of labels \(3\)"),
    (lambda s: s["outputs"][0].update(prompts=["x"]), r"1 prompts for 3 labels"),
    (lambda s: s["inputs"].append({"name": "ids", "modality": "text", "feature": "attention_mask",
                                   "dtype": "int64", "shape": ["batch", "sequence"]}),
     r"a text model needs an input with feature input_ids"),
    (lambda s: s.update(workload="Shop Items"), r"workload: String should match pattern"),
])
def test_signature_file_errors(user: Path, change: Callable[[dict], None], message: str) -> None:
    sig = yaml.safe_load((user / "sig.yaml").read_text())
    change(sig)
    (user / "bad.yaml").write_text(yaml.safe_dump(sig))
    with pytest.raises(ConfigError, match=r"signature file .*bad\.yaml is invalid: .*" + message):
        load_signature(user / "bad.yaml")


def test_text_without_tokenizer(user: Path) -> None:
    sig = {"workload": "shop", "inputs": [{"name": "ids", "modality": "text", "dtype": "int64",
                                           "shape": ["batch", "sequence"],
                                           "preprocessing": {"tokenizer": "nowhere", "max_length": 16}}],
           "outputs": [{"name": "category", "type": "multiclass", "labels": ["a", "b", "c"]}]}
    (user / "t.yaml").write_text(yaml.safe_dump(sig))
    sys.path.insert(0, str(user))
    from usermodels.tagger import TextTagger

    path = user / "text.onnx"
    torch.onnx.export(TextTagger().eval(), (torch.ones(2, 5, dtype=torch.long),), str(path), input_names=["ids"],
                      output_names=["category"], opset_version=17, dynamo=False,
                      dynamic_axes={"ids": {0: "batch", 1: "sequence"}, "category": {0: "batch"}})
    with pytest.raises(byo.ByoError, match=r"the text input needs a tokenizer: .*nowhere has no tokenizer\.json"):
        byo.package_onnx(path, user / "t.yaml", user / "pkg")


def test_cli_reports_errors_without_traceback(user: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.tooling.cli import main

    rc = main(["package", "--module", "nowhere.x:Y", "--weights", "w.safetensors", "--signature",
               str(user / "sig.yaml"), "--out", str(user / "pkg")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: cannot import module 'nowhere.x'" in err and "Traceback" not in err
    rc = main(["package", "--onnx", "x.onnx", "--out", str(user / "pkg")])
    assert rc == 2 and "need --signature" in capsys.readouterr().err
    assert isinstance(byo.ByoError("x"), PackageError)
    assert np.dtype("float32")  # numpy is what serving needs


# -- models brought as they are: int8, samples, extra modalities, tokenizers -------------------------------------
def test_int8_that_would_quantize_nothing_is_refused(user: Path) -> None:
    """The Tagger's only dense layer is its head, which stays fp32: an "int8"
    file would be the fp32 model renamed, so the export says so and stops."""
    with pytest.raises(ExportError, match=r"int8 variant refused: all 1 of the model's MatMul/Gemm nodes with "
                                          r"weights are its heads, which stay fp32 \(/inner/head/Gemm\).*drop int8"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=weights_for(user),
                           samples=samples(user), variants=("fp32", "int8"))
    assert not (user / "pkg").exists()


def _with(path: Path, out: Path, **fields: object) -> Path:
    recs = [{**json.loads(line), **fields} for line in path.read_text().splitlines()]
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def test_samples_with_an_extra_modality_are_used_and_counted(user: Path) -> None:
    """Sample records that carry text the image-only model does not take are
    used (the field ignored), and the report says so."""
    extra = _with(samples(user), user / "extra.jsonl", text="a red shirt")
    pkg = byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=weights_for(user),
                             samples=extra)
    assert pkg.manifest.parity["samples"] == {"given": 10, "used": 10, "not_used": {},  # type: ignore[index]
                                              "extra_ignored": {"text": 10}}


def test_no_usable_samples_says_why(user: Path) -> None:
    wrong = _with(samples(user), user / "wrong.jsonl", workload="retail")
    with pytest.raises(ExportError, match=r"only 0 of 10 sample records are usable; parity needs at least 8\. "
                                          r"Not used: 10 workload_mismatch \(e\.g\. record is for workload "
                                          r"'retail'; this model serves 'shop'\)"):
        byo.package_module("usermodels.tagger:Tagger", user / "sig.yaml", user / "pkg", weights=weights_for(user),
                           samples=wrong)


def test_extra_modalities_reject_or_ignore(user: Path) -> None:
    """Deployment setting limits.extra_modalities: reject (default) keeps
    today's reason code; ignore drops the field and counts it."""
    from prometheus_client import CollectorRegistry

    from pipeline.config import EngineConfig, Limits, load_settings
    from pipeline.engines import create_engine
    from pipeline.metrics import get_metrics
    from pipeline.predictor import Predictor

    pkg = byo.package_onnx(_export(user, (2, 3, 16, 16)), user / "sig.yaml", user / "pkg")
    rec = json.loads(samples(user, 1).read_text().splitlines()[0])
    records = [json.dumps({**rec, "text": "a red shirt", "audio": "AAAA"}),
               json.dumps({"id": "t", "workload": "shop", "text": "text only"})]
    engine = create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu"))
    default = Predictor(pkg, engine, metrics=get_metrics(CollectorRegistry())).predict(records)
    assert [r.error.code for r in default] == ["modality_not_supported"] * 2  # type: ignore[union-attr]
    assert "limits.extra_modalities: ignore" in default[0].error.message  # type: ignore[union-attr]
    settings = load_settings(env={"MMPIPE__LIMITS__EXTRA_MODALITIES": "ignore"})
    assert settings.limits is not None and settings.limits.extra_modalities == "ignore"
    registry = CollectorRegistry()
    pred = Predictor(pkg, engine, limits=settings.limits, metrics=get_metrics(registry))
    got = pred.predict(records)
    alone = pred.predict([json.dumps(rec)])[0]
    assert got[0].error is None and got[0].heads == alone.heads  # the text and audio changed nothing
    assert got[1].error.code == "no_modality"  # type: ignore[union-attr]  # nothing left the model takes
    labels = {"path": "cli", "workload": "shop", "model": pkg.name}
    count = {m: registry.get_sample_value("mmpipe_ignored_modalities_total", {**labels, "modality": m})
             for m in ("text", "audio")}
    assert count == {"text": 2.0, "audio": 1.0}
    with pytest.raises(ValueError, match="extra_modalities"):
        Limits(extra_modalities="keep")  # type: ignore[arg-type]


def _text_image_user(user: Path, tokenizer: object) -> tuple[Path, Path, Path]:
    """The TextImageTagger's weights, signature (with ``tokenizer``) and
    samples, one of which has no text."""
    sys.path.insert(0, str(user))
    from usermodels.tagger import TextImageTagger

    torch.manual_seed(0)
    save_file(TextImageTagger().state_dict(), str(user / "ti.safetensors"))
    tokenizer.save(str(user / "tok" / "tokenizer.json"))  # type: ignore[attr-defined]
    sig = {"workload": "shop", "inputs": [
        {"name": "ids", "modality": "text", "dtype": "int64", "shape": ["batch", "sequence"],
         "preprocessing": {"tokenizer": "tok", "max_length": 16}},
        {"name": "mask", "modality": "text", "feature": "attention_mask", "dtype": "int64",
         "shape": ["batch", "sequence"]},
        {"name": "image", "modality": "image", "shape": ["batch", 3, 16, 16], "preprocessing": {"size": 16}}],
        "outputs": [{"name": "category", "type": "multiclass", "labels": ["a", "b", "c"]}]}
    (user / "ti.yaml").write_text(yaml.safe_dump(sig))
    return user / "ti.safetensors", user / "ti.yaml", samples(user)  # image-only records: no text at all


def _tokenizer(special: bool) -> object:
    from pipeline.tokenizer import train_wordpiece

    tok = train_wordpiece(["a red shirt", "a blue phone", "fresh bread"], vocab_size=200)
    if not special:
        data = json.loads(tok.to_str())
        data["post_processor"] = None  # as a tokenizer trained without a template is saved
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(json.dumps(data))
    return tok


def test_tokenizer_without_special_tokens_and_records_without_text(user: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (user / "tok").mkdir()
    weights, sig, recs = _text_image_user(user, _tokenizer(special=False))
    with pytest.raises(byo.ByoError, match=r"turns an empty text into no tokens at all \(it adds no \[CLS\]/\[SEP\]"
                                           r".*it also takes image.*length 0\. Give the tokenizer a post-processor"):
        byo.package_module("usermodels.tagger:TextImageTagger", sig, user / "pkg", weights=weights, samples=recs)
    assert not (user / "pkg").exists() and not list(user.glob(".pkg.*"))
    from pipeline.tooling.cli import main

    rc = main(["package", "--module", "usermodels.tagger:TextImageTagger", "--weights", str(weights),
               "--signature", str(sig), "--samples", str(recs), "--out", str(user / "pkg")])
    err = capsys.readouterr().err
    assert rc == 2 and "turns an empty text into no tokens" in err and "Traceback" not in err
    # the same model with a tokenizer that adds [CLS]/[SEP] packages, text-less records and all
    weights, sig, recs = _text_image_user(user, _tokenizer(special=True))
    pkg = byo.package_module("usermodels.tagger:TextImageTagger", sig, user / "pkg", weights=weights, samples=recs)
    assert pkg.manifest.parity["variants"]["fp32"]["passed"]  # type: ignore[index]
