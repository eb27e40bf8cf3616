"""Bring your own model, each way in, end to end.

* **module**: the worked example (``examples/byo``: a plain nn.Module, BERT-
  style text + ResNet-style image, concat, linear heads), trained a few
  steps by its own script, packaged with ``--module``;
* **hf**: a tiny ``VisionTextDualEncoderModel`` (BERT + ViT) saved with
  ``save_pretrained`` with its own tokenizer, packaged with ``--hf-dir`` as a
  zero-shot tagger (one prompt per label);
* **onnx**: the example model exported to ONNX "elsewhere" (plain
  ``torch.onnx.export``, its own output names mapped onto heads), packaged
  with ``--onnx``.

Each package through the Predictor on ONNX Runtime gives the labels (and
scores) the user's own PyTorch model gives on the same records; then the
three packages, unchanged, through one real Ray Serve app (``/v1``) and the
real Ray Data batch job give the Predictor's results.  No torch on those
paths: the packages hold ONNX only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from exporters import byo  # noqa: E402
from pipeline.config import EngineConfig, Settings  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.package import ModelPackage  # noqa: E402
from pipeline.ports import free_port  # noqa: E402
from pipeline.postprocess import head_result  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.records import Result  # noqa: E402
from pipeline.tokenizer import TextEncoder, train_wordpiece  # noqa: E402
from tests.compare import assert_same  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "byo"
WAYS = ("module", "hf", "onnx")
WORKLOAD = {"module": "shop", "hf": "gallery", "onnx": "shop-onnx"}
PROMPTS = ["a shirt or dress", "a phone or laptop", "food from the grocery", "a chair or table", "a toy"]


def _records(path: Path, workload: str) -> list[dict]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{**r, "workload": workload} for r in recs]


def _write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- the three ways in ------------------------------------------------------------------------------------------
def _hf_checkpoint(work: Path, texts: list[str]) -> Path:
    """A tiny BERT + ViT dual encoder saved as a user would, with its tokenizer."""
    from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

    torch.manual_seed(7)
    enc = TextEncoder(train_wordpiece(texts, vocab_size=600), 32)
    text_cfg = BertConfig(vocab_size=enc.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
    vision_cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vision_cfg, text_cfg, projection_dim=16)
    model = VisionTextDualEncoderModel(cfg).eval()
    out = work / "clip-gallery"
    model.save_pretrained(out)
    enc.save(out)  # tokenizer.json beside the weights, as tokenizer.save_pretrained leaves it
    return out


def _hf_signature(work: Path) -> Path:
    sig = {
        "workload": WORKLOAD["hf"], "name": "gallery-clip",
        "inputs": [
            {"name": "input_ids", "modality": "text", "dtype": "int64", "shape": ["batch", "sequence"],
             "preprocessing": {"max_length": 32}},
            {"name": "attention_mask", "modality": "text", "feature": "attention_mask", "dtype": "int64",
             "shape": ["batch", "sequence"]},
            {"name": "pixel_values", "modality": "image", "dtype": "float32", "shape": ["batch", 3, 32, 32],
             "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}},
            {"name": "presence", "modality": "presence", "dtype": "float32", "shape": ["batch", 2]},
        ],
        "outputs": [{"name": "category", "type": "multiclass", "top_k": 2,
                     "labels": ["apparel", "electronics", "grocery", "furniture", "toys"], "prompts": PROMPTS}],
    }
    path = work / "gallery.yaml"
    path.write_text(yaml.safe_dump(sig, sort_keys=False))
    return path


def _onnx_elsewhere(model: Any, work: Path) -> tuple[Path, Path]:
    """The example model exported by the user's own script, outputs under
    its own names, and a signature that maps them onto heads."""

    class Export(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, token_ids: Any, token_mask: Any, image: Any) -> tuple[Any, Any]:
            out = self.m(token_ids=token_ids, token_mask=token_mask, image=image)
            return out["category"], out["attributes"]

    path = work / "elsewhere" / "tagger.onnx"
    path.parent.mkdir()
    ex = Export().eval()
    args = (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 3, 64, 64))
    torch.onnx.export(ex, args, str(path), input_names=["token_ids", "token_mask", "image"],
                      output_names=["cat_logits", "attr_logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"token_ids": {0: "batch", 1: "sequence"},
                                    "token_mask": {0: "batch", 1: "sequence"}, "image": {0: "batch"},
                                    "cat_logits": {0: "batch"}, "attr_logits": {0: "batch"}})
    sig = yaml.safe_load((work / "shop" / "signature.yaml").read_text())
    sig.update(workload=WORKLOAD["onnx"], name="shop-onnx")
    sig["inputs"][0]["preprocessing"]["tokenizer"] = str(work / "shop" / "tokenizer")
    sig["outputs"][0].update(name="cat_logits", head="category")
    sig["outputs"][1].update(name="attr_logits", head="attributes")
    sig_path = work / "elsewhere" / "signature.yaml"
    sig_path.write_text(yaml.safe_dump(sig, sort_keys=False))
    return path, sig_path


class Way:
    """One brought model: its package, records and the user's own reference."""

    def __init__(self, package: ModelPackage, records: list[dict], reference: Callable[[dict], dict]) -> None:
        self.package = package
        self.records = records
        self.reference = reference  # feeds by the model's input names -> logits by output name


@pytest.fixture(scope="module")
def ways(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Way]:
    sys.path.insert(0, str(EXAMPLE))
    from safetensors.torch import load_file
    from shop_model import ShopTagger
    from train import train

    work = tmp_path_factory.mktemp("byo")
    shop = train(work / "shop", records=96, epochs=1)
    init_args = json.loads((shop / "init_args.json").read_text())
    user_model = ShopTagger(**init_args)
    user_model.load_state_dict(load_file(str(shop / "weights.safetensors")))
    user_model.eval()
    shop_records = _records(shop / "records.jsonl", WORKLOAD["module"])[:24]

    def run_user(feeds: dict) -> dict:
        with torch.inference_mode():
            return {k: v.numpy() for k, v in user_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).items()}

    out: dict[str, Way] = {}
    pkg = byo.package_module("shop_model:ShopTagger", shop / "signature.yaml", work / "pkg-module",
                             weights=shop / "weights.safetensors", init_args=init_args,
                             samples=shop / "records.jsonl", variants=("fp32", "int8"), search_path=[EXAMPLE])
    out["module"] = Way(pkg, shop_records, run_user)

    texts = [r["text"] for r in _records(shop / "records.jsonl", "x") if r.get("text")] + PROMPTS
    hf_dir = _hf_checkpoint(work, texts)
    gallery = _records(shop / "records.jsonl", WORKLOAD["hf"])
    samples = _write_jsonl(gallery, work / "gallery.jsonl")
    pkg = byo.package_hf(hf_dir, _hf_signature(work), work / "pkg-hf", samples=samples)
    out["hf"] = Way(pkg, gallery[:24], _clip_reference(hf_dir, PROMPTS))

    onnx_file, onnx_sig = _onnx_elsewhere(user_model, work)
    pkg = byo.package_onnx(onnx_file, onnx_sig, work / "pkg-onnx")

    def run_user_renamed(feeds: dict) -> dict:
        got = run_user(feeds)
        return {"cat_logits": got["category"], "attr_logits": got["attributes"]}

    out["onnx"] = Way(pkg, _records(shop / "records.jsonl", WORKLOAD["onnx"])[:24], run_user_renamed)
    return out


def _clip_reference(hf_dir: Path, prompts: list[str]) -> Callable[[dict], dict]:
    """Zero-shot tagging as the transformers user writes it: cosine of the
    record's embedding (image and text averaged over what it has) with each
    prompt's, times the model's logit scale."""
    from transformers import VisionTextDualEncoderModel

    model = VisionTextDualEncoderModel.from_pretrained(str(hf_dir), local_files_only=True).eval()
    enc = TextEncoder.load(hf_dir, 32)

    def unit(x: Any) -> Any:
        x = x if isinstance(x, torch.Tensor) else x.pooler_output
        return x / x.norm(dim=-1, keepdim=True)

    rows = [enc.encode(p).ids for p in prompts]
    n = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [enc.pad_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    with torch.inference_mode():
        labels = unit(model.get_text_features(input_ids=ids, attention_mask=mask))

    def run(feeds: dict) -> dict:
        with torch.inference_mode():
            img = unit(model.get_image_features(pixel_values=torch.from_numpy(feeds["pixel_values"])))
            txt = unit(model.get_text_features(input_ids=torch.from_numpy(feeds["input_ids"]),
                                               attention_mask=torch.from_numpy(feeds["attention_mask"])))
            p = torch.from_numpy(feeds["presence"])
            rec = p[:, 1:2] * img + p[:, 0:1] * txt
            rec = rec / rec.norm(dim=-1, keepdim=True)
            return {"category": (model.logit_scale.exp() * rec @ labels.T).numpy()}

    return run


def reference_results(way: Way) -> list[Result]:
    """The user's PyTorch model on the records, with the package's labels."""
    pkg = way.package
    pre = Preprocessor(pkg.spec, pkg.text_encoder(), inputs=pkg.manifest.signature.inputs)
    prepared = [pre.prepare(r) for r in way.records]
    logits = way.reference(pre.collate(prepared))
    by_head = pkg.manifest.signature.head_outputs()
    return [Result(id=p.id, workload=p.workload, model=pkg.name, model_version=pkg.version,
                   heads={h.name: head_result(h, logits[by_head[h.name]][i]) for h in pkg.spec.heads})
            for i, p in enumerate(prepared)]




def onnx_predictor(pkg: ModelPackage, path: str = "cli") -> Predictor:
    return Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", threads=1)), path=path)


# -- each way: package -> Predictor (ONNX Runtime) -> the user's labels ----------------------------------------------
@pytest.mark.parametrize("way", WAYS)
def test_package_predicts_like_the_users_model(ways: dict[str, Way], way: str) -> None:
    w = ways[way]
    m = w.package.manifest
    assert m.source is not None and m.source["kind"] == way
    assert m.workload.name == WORKLOAD[way] and "torch" not in m.variants and "onnx-fp32" in m.variants
    if way != "onnx":
        assert m.parity is not None and m.parity["variants"]["fp32"]["passed"]
    pred = onnx_predictor(w.package)
    assert pred.engine is not None and pred.engine.name == "onnxruntime"
    got = pred.predict([json.dumps(r) for r in w.records])
    assert_same(got, reference_results(w))
    labels = {ls.label for r in got for ls in r.heads["category"].labels[:1]}  # type: ignore[index]
    assert labels, "no labels at all"
    # a bad record still gets a reason-coded error, the others answer
    mixed = pred.predict([json.dumps(w.records[0]), "{not json", json.dumps({**w.records[1], "workload": "retail"})])
    assert mixed[0].error is None and mixed[1].error.code == "bad_json"  # type: ignore[union-attr]
    assert mixed[2].error.code == "workload_mismatch"  # type: ignore[union-attr]


def test_int8_variant_of_a_brought_module(ways: dict[str, Way]) -> None:
    """The family's variants apply: int8 passed its parity check and serves."""
    pkg = ways["module"].package
    assert pkg.manifest.parity["variants"]["int8"]["passed"]  # type: ignore[index]
    pred = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", variant="int8", device="cpu")))
    got = pred.predict([json.dumps(r) for r in ways["module"].records])
    assert all(r.error is None for r in got)


def test_cli_package_predict(ways: dict[str, Way], tmp_path: Path) -> None:
    """`mmpipe package --onnx` and `mmpipe predict` as a user runs them."""
    elsewhere = ways["onnx"].package.root.parent / "elsewhere"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "pipeline", "--log-level", "WARNING", "package", "--onnx",
                        str(elsewhere / "tagger.onnx"), "--signature", str(elsewhere / "signature.yaml"),
                        "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "package shop-onnx v1 (shop-onnx)" in r.stdout
    recs = _write_jsonl(ways["onnx"].records[:6], tmp_path / "recs.jsonl")
    r = subprocess.run([sys.executable, "-m", "pipeline", "--log-level", "WARNING", "predict", "--package",
                        str(out), "--input", str(recs)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    got = [Result.model_validate_json(line) for line in r.stdout.splitlines()]
    w = ways["onnx"]
    assert_same(got, reference_results(Way(w.package, w.records[:6], w.reference)))


# -- the Ray Serve path: the three packages in one app ---------------------------------------------------------------
def _serve(packages: list[ModelPackage], work: Path) -> Iterator[str]:
    port = free_port()
    small = {"num_cpus": 0.5, "num_gpus": 0}  # one server deployment holds the three models
    config = {
        "proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "byo", "route_prefix": "/", "import_path": "deploy.serve.app:build_app",
            "args": {"models": [{"package": str(p.root)} for p in packages]},
            "deployments": [{"name": "server", "ray_actor_options": small}],
        }],
    }
    cfg = work / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmb", dir="/tmp"))
    log = work / "serve.log"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.serve.cli", "--config", str(cfg), "--num-cpus", "2"],
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not re.search(r"^ready", log.read_text(errors="replace"), re.M):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mmpipe serve did not start (rc={proc.poll()}):\n{log.read_text()[-6000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_serve_path_unchanged(ways: dict[str, Way], tmp_path: Path) -> None:
    pytest.importorskip("ray.serve")
    requests = pytest.importorskip("requests")
    for url in _serve([ways[w].package for w in WAYS], tmp_path):
        for way in WAYS:
            w = ways[way]
            r = requests.post(f"{url}/v1/{WORKLOAD[way]}/predict", json={"records": w.records}, timeout=120)
            assert r.status_code == 200, r.text
            body = r.json()
            got = body["results"] if isinstance(body, dict) else body
            assert_same(got, onnx_predictor(w.package).predict(w.records))
            meta = requests.get(f"{url}/v2/models/{w.package.name}", timeout=30).json()
            assert [t["name"] for t in meta["inputs"]] == [t.name for t in w.package.manifest.signature.inputs]


# -- the batch path ----------------------------------------------------------------------------------------------------
def test_batch_path_unchanged(ways: dict[str, Way], tmp_path: Path) -> None:
    pytest.importorskip("ray.data")
    from pipeline.batch import JobOptions, run_batch
    from pipeline.batch.output import read_results
    from tests.integration.batch_helpers import local_ray

    with local_ray(prefix="mmb-"):
        settings = Settings(engine=EngineConfig(kind="onnxruntime", device="cpu", threads=1))
        settings.batch.progress = False
        for way in WAYS:
            w = ways[way]
            src = _write_jsonl(w.records, tmp_path / f"{way}.jsonl")
            out = tmp_path / f"out-{way}"
            summary = run_batch(settings, JobOptions(input=str(src), output=str(out), run_date="2026-05-01",
                                                     package=str(w.package.root)))
            assert summary["records_in"] == len(w.records) and summary["results"] == len(w.records)
            rows = {r["id"]: r for r in read_results(out).to_pylist()}
            want = onnx_predictor(w.package).predict(w.records)
            assert_same([Result.model_validate_json(rows[x.id]["result"]) for x in want], want)


def test_reference_is_not_trivial(ways: dict[str, Way]) -> None:
    """The comparison can fail: a different model gives different scores."""
    w = ways["module"]
    want = reference_results(w)
    def shifted(feeds: dict) -> dict:
        return {k: v + np.arange(v.shape[-1]) for k, v in w.reference(feeds).items()}

    other = Way(w.package, w.records, shifted)
    with pytest.raises(AssertionError):
        assert_same(want, reference_results(other))
