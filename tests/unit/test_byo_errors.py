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
    with pytest.raises(byo.ByoError, match=r"has no 'Tagr'; it defines \['Tagger', 'TextTagger', 'make_tagger'\]"):
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
