"""Models brought exactly as their authors wrote them, end to end.

* **CLIP** (``CLIPModel`` from small configs, saved with ``save_pretrained``)
  packaged with ``--hf-dir`` as a zero-shot tagger whose signature has no
  presence input, with an int8 variant: the int8 file is int8 (its dense
  layers quantized, the zero-shot head fp32, the count and size ratio in the
  parity report), and an image-only record is scored on its image alone,
  a text-only record on its text alone.
* **A tutorial-style text classifier** (``nn.TransformerEncoder`` over
  embeddings, mean over positions, no attention mask): packaging warns;
  every batch is padded to max_length so a record's scores do not depend
  on its neighbours, which parity checks (batch 1 vs 16) and would catch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from exporters import byo  # noqa: E402
from exporters.onnx_export import ExportError  # noqa: E402
from pipeline.config import EngineConfig  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.package import ModelPackage  # noqa: E402
from pipeline.postprocess import head_result  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.records import Result, json_safe  # noqa: E402
from pipeline.tokenizer import TextEncoder, train_wordpiece  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from tests.compare import assert_same  # noqa: E402

LABELS = ["apparel", "electronics", "grocery", "furniture", "toys"]
PROMPTS = ["a shirt or dress", "a phone or laptop", "food from the grocery", "a chair or table", "a toy"]


def _records(workload: str, n: int, seed: int) -> list[dict]:
    """Retail sample records (text + photo) under another workload name."""
    out = []
    for s in sample_data.generate("retail", n, seed=seed, missing_rate=0.0):
        rec = {k: v for k, v in json_safe(s.record).items() if k in ("id", "text", "image")}
        out.append({**rec, "workload": workload})
    return out


def _write(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _predict(pkg: ModelPackage, records: list[dict], batch_size: int = 32, variant: str = "fp32") -> list[Result]:
    engine = create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", threads=1, variant=variant))
    return Predictor(pkg, engine, batch_size=batch_size).predict([json.dumps(r) for r in records])


def _reference(pkg: ModelPackage, records: list[dict], logits_of: Callable[[dict], np.ndarray]) -> list[Result]:
    """Results from the user's own torch code, with the package's labels."""
    pre = Preprocessor.for_package(pkg)
    prepared = [pre.prepare(json.dumps(r)) for r in records]
    logits = logits_of(pre.collate(prepared))
    head = pkg.spec.heads[0]
    return [Result(id=p.id, workload=p.workload, model=pkg.name, model_version=pkg.version,
                   heads={head.name: head_result(head, logits[i])}) for i, p in enumerate(prepared)]


# -- CLIP, zero-shot, no presence input in the signature --------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    work = tmp_path_factory.mktemp("clip")
    records = _records("gallery", 48, seed=5)
    enc = TextEncoder(train_wordpiece([r["text"] for r in records if r.get("text")] + PROMPTS, vocab_size=600), 32)
    torch.manual_seed(11)
    cfg = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=enc.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                   pad_token_id=enc.pad_id, bos_token_id=2, eos_token_id=3).to_dict(),
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        projection_dim=16)
    hf_dir = work / "clip"
    CLIPModel(cfg).eval().save_pretrained(hf_dir)
    enc.save(hf_dir)
    sig = {"workload": "gallery", "name": "gallery-clip", "inputs": [
        {"name": "input_ids", "modality": "text", "dtype": "int64", "shape": ["batch", "sequence"],
         "preprocessing": {"max_length": 32}},
        {"name": "attention_mask", "modality": "text", "feature": "attention_mask", "dtype": "int64",
         "shape": ["batch", "sequence"]},
        {"name": "pixel_values", "modality": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32],
         "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}],  # no presence input
        "outputs": [{"name": "category", "type": "multiclass", "top_k": 2, "labels": LABELS, "prompts": PROMPTS}]}
    (work / "sig.yaml").write_text(yaml.safe_dump(sig, sort_keys=False))
    pkg = byo.package_hf(hf_dir, work / "sig.yaml", work / "pkg", samples=_write(records, work / "s.jsonl"),
                         variants=("fp32", "int8"))
    return {"pkg": pkg, "records": records, "model": CLIPModel.from_pretrained(str(hf_dir)).eval(), "enc": enc}


def _clip_logits(model: Any, enc: TextEncoder, use: str) -> Callable[[dict], np.ndarray]:
    """Zero-shot as a transformers user writes it, on one tower only."""

    def unit(x: Any) -> Any:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output
        return x / x.norm(dim=-1, keepdim=True)

    rows = [enc.encode(p).ids for p in PROMPTS]
    n = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [enc.pad_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])

    def run(feeds: dict) -> np.ndarray:
        with torch.inference_mode():
            labels = unit(model.get_text_features(input_ids=ids, attention_mask=mask))
            if use == "image":
                rec = unit(model.get_image_features(pixel_values=torch.from_numpy(feeds["pixel_values"])))
            else:
                rec = unit(model.get_text_features(input_ids=torch.from_numpy(feeds["input_ids"]),
                                                   attention_mask=torch.from_numpy(feeds["attention_mask"])))
            return (model.logit_scale.exp() * rec @ labels.T).numpy()

    return run


def test_zero_shot_without_presence_input_scores_what_a_record_has(clip: dict[str, Any]) -> None:
    pkg = clip["pkg"]
    sig = pkg.manifest.signature
    assert [(i.name, i.feature) for i in sig.inputs][-1] == ("presence", "presence")  # added, listed
    image_only = [{k: v for k, v in r.items() if k != "text"} for r in clip["records"][:16]]
    text_only = [{k: v for k, v in r.items() if k != "image"} for r in clip["records"][16:32]]
    for recs, use in ((image_only, "image"), (text_only, "text")):
        want = _reference(pkg, recs, _clip_logits(clip["model"], clip["enc"], use))
        assert_same(_predict(pkg, recs), want)
    # The comparison has teeth: image and empty text averaged (the old way) gives other top-1 labels.
    both = _clip_logits(clip["model"], clip["enc"], "image")
    empty = _clip_logits(clip["model"], clip["enc"], "text")
    mixed = _reference(pkg, image_only, lambda f: (both(f) + empty(f)) / 2)
    right = _reference(pkg, image_only, both)
    assert [r.heads["category"].labels[0].label for r in mixed] != [  # type: ignore[index]
        r.heads["category"].labels[0].label for r in right]  # type: ignore[index]


def test_clip_int8_is_int8(clip: dict[str, Any]) -> None:
    pkg = clip["pkg"]
    v = pkg.manifest.parity["variants"]["int8"]  # type: ignore[index]
    q = v["quantization"]
    assert v["passed"], v["failures"]
    assert q["quantized"] >= 20 and q["quantized"] == q["weight_nodes"] - len(q["kept_fp32"])
    assert q["kept_why"] == "heads" and len(q["kept_fp32"]) == 1  # the zero-shot scores against the prompts
    # Smaller, as measured (a tiny model: embeddings and convolutions, which stay fp32, weigh a lot).
    sizes = [pkg.path(f"onnx/model{v}.onnx").stat().st_size for v in ("", ".int8")]
    assert q["size_ratio"] == round(sizes[1] / sizes[0], 4) and q["size_ratio"] < 0.95
    import onnx

    graph = onnx.load(str(pkg.path("onnx/model.int8.onnx"))).graph
    integer = [n.name for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == q["quantized"] and not any(n.startswith(q["kept_fp32"][0]) for n in integer)
    got = _predict(pkg, clip["records"][:8], variant="int8")
    assert all(r.error is None for r in got)
    assert "near_ties" in v and v["batch"]["sizes"] == [1, 16]


# -- a tutorial-style classifier without an attention mask ---------------------------------------------------
TUTORIAL = '''
import math

import torch
from torch import nn


class TransformerClassifier(nn.Module):
    """Embeddings + positions, nn.TransformerEncoder, mean over positions,
    a linear layer: token ids in, class logits out."""

    def __init__(self, vocab_size: int, n_classes: int, d_model: int = 32, max_len: int = 64) -> None:
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(1, max_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(d_model, n_classes)

    def forward(self, src):
        x = self.embedding(src) * math.sqrt(self.d_model) + self.pos[:, : src.shape[1]]
        return self.fc(self.encoder(x).mean(dim=1))


class CNNClassifier(nn.Module):
    """Embeddings, a 1-d convolution, mean over positions, a linear layer."""

    def __init__(self, vocab_size: int, n_classes: int, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, src):
        x = torch.relu(self.conv(self.embedding(src).transpose(1, 2)))
        return self.fc(x.mean(dim=2))
'''


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from safetensors.torch import save_file

    work = tmp_path_factory.mktemp("tutorial")
    (work / "tutorial_model.py").write_text(TUTORIAL)
    records = [{k: v for k, v in r.items() if k != "image"} for r in _records("reviews", 48, seed=8)]
    enc = TextEncoder(train_wordpiece([r["text"] for r in records], vocab_size=400), 24)
    enc.save(work / "tokenizer")
    import sys

    sys.path.insert(0, str(work))
    from tutorial_model import TransformerClassifier

    torch.manual_seed(3)
    init = {"vocab_size": enc.vocab_size, "n_classes": len(LABELS)}
    save_file(TransformerClassifier(**init).state_dict(), str(work / "w.safetensors"))
    sig = {"workload": "reviews", "inputs": [
        {"name": "src", "modality": "text", "dtype": "int64", "shape": ["batch", "sequence"],
         "preprocessing": {"tokenizer": "tokenizer", "max_length": 24}}],
        "outputs": [{"name": "category", "type": "multiclass", "labels": LABELS}]}
    (work / "sig.yaml").write_text(yaml.safe_dump(sig, sort_keys=False))
    samples = _write(records, work / "s.jsonl")
    pkg = byo.package_module("tutorial_model:TransformerClassifier", work / "sig.yaml", work / "pkg",
                             weights=work / "w.safetensors", init_args=init, samples=samples, search_path=[work])
    return {"pkg": pkg, "records": records, "work": work, "init": init, "samples": samples}


def test_no_attention_mask_warns_and_answers_do_not_depend_on_the_batch(tutorial: dict[str, Any]) -> None:
    pkg = tutorial["pkg"]
    assert pkg.manifest.signature.needs_fixed_length
    report = pkg.manifest.parity
    assert report is not None and any("takes no attention mask" in w for w in report["warnings"])
    fp32 = report["variants"]["fp32"]
    assert fp32["passed"] and max(d["logit_abs"] for d in fp32["batch"]["max"].values()) < 1e-5
    feeds = Preprocessor.for_package(pkg).collate([Preprocessor.for_package(pkg).prepare(json.dumps(
        tutorial["records"][0]))])
    assert feeds["src"].shape == (1, 24)  # one short record, padded to max_length
    recs = tutorial["records"][:32]
    assert_same(_predict(pkg, recs, batch_size=1), _predict(pkg, recs, batch_size=16))


def _package(tutorial: dict[str, Any], cls: str, out: str) -> ModelPackage:
    from safetensors.torch import save_file
    from tutorial_model import CNNClassifier

    work = tutorial["work"]
    if not (work / "cnn.safetensors").exists():
        torch.manual_seed(4)
        save_file(CNNClassifier(**tutorial["init"]).state_dict(), str(work / "cnn.safetensors"))
    weights = work / ("cnn.safetensors" if cls == "CNNClassifier" else "w.safetensors")
    return byo.package_module(f"tutorial_model:{cls}", work / "sig.yaml", work / out, weights=weights,
                              init_args=tutorial["init"], samples=tutorial["samples"], search_path=[work])


def test_parity_catches_padding_that_reaches_results(tutorial: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Padded to the longest text instead of max_length, a model without an
    attention mask fails parity: its scores move with the batch."""
    assert _package(tutorial, "CNNClassifier", "cnn").manifest.parity["variants"]["fp32"]["passed"]  # type: ignore[index]
    capsys.readouterr()
    monkeypatch.setattr(Preprocessor, "fixed_length", property(lambda self: None))  # pad to the longest
    with pytest.raises(ExportError, match=r"category: a record's scores depend on its batch \(batch 1 vs 16: "
                                          r"max \|dlogit\| .* > 0\.001"):
        _package(tutorial, "CNNClassifier", "cnn-longest")
    out = capsys.readouterr().out
    assert "warning: the model takes no attention mask" in out and "batch 1 vs 16" in out
    assert not (tutorial["work"] / "cnn-longest").exists()
    # The transformer tutorial's export fixes the sequence length (nn.MultiheadAttention reshapes by a
    # Python int); fed other lengths, the graph fails, and parity says so instead of a stack trace.
    with pytest.raises(ExportError, match=r"the exported graph fails on inputs shaped src \[\d+, \d+\].*compute it "
                                          r"from the tensor's shape"):
        _package(tutorial, "TransformerClassifier", "tf-longest")
