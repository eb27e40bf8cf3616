"""Triton model repository writer: layout, configs Triton can parse, values as
asked, refusals; and the python-backend models' batch logic without a server.

Every config.pbtxt is parsed with the ModelConfig protobuf that tritonclient
ships (the schema Triton itself loads), for every combination of options.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (the ModelConfig schema) is not installed"
)
from google.protobuf import text_format  # noqa: E402

from exporters.triton_repo import (  # noqa: E402
    DEPLOY_DIR,
    TritonRepoError,
    add_parser,
    build_triton_repo,
    repository_models,
    to_pbtxt,
)
from pipeline.config import EngineConfig, GenerateConfig, Limits  # noqa: E402
from pipeline.engines import create_engine  # noqa: E402
from pipeline.errors import PackageError  # noqa: E402
from pipeline.generate import GenerationError, Generator  # noqa: E402
from pipeline.oip import GENERATE_INPUTS, GENERATE_OUTPUTS, GENERATE_SUFFIX, token_event_tensors  # noqa: E402
from pipeline.package import load_package, sha256_file  # noqa: E402
from pipeline.predictor import Predictor  # noqa: E402
from pipeline.preprocess import Preprocessor  # noqa: E402
from pipeline.records import record_bytes  # noqa: E402
from pipeline.tooling import sample_data  # noqa: E402
from tests.integration.triton_server import onnx_package  # noqa: E402

MC = model_config_pb2.ModelConfig


@pytest.fixture(scope="module")
def onnx_pkgs(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """medical (text + image + audio, token head) and retail (tabular) with ONNX."""
    root = tmp_path_factory.getbasetemp() / "triton-onnx-packages"
    return {w: onnx_package(tiny_packages[w], root) for w in ("medical", "retail")}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), MC())


def configs(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: parse(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def load_backend_model(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"triton_{name}_model", DEPLOY_DIR / name / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- layout ----------------------------------------------------------------------------------
def test_layout(onnx_pkgs: dict[str, Path], tmp_path: Path) -> None:
    pkg = load_package(onnx_pkgs["medical"])
    repo = build_triton_repo(pkg.root, tmp_path / "repo")
    n = pkg.name
    assert repo == tmp_path / "repo"
    assert sorted(p.name for p in repo.iterdir()) == sorted(
        [n, f"{n}_cpu", f"{n}_preprocess", f"{n}_ensemble", f"{n}_ensemble_cpu"])
    digest = pkg.manifest.files["onnx/model.onnx"]
    for m in (n, f"{n}_cpu"):
        assert sha256_file(repo / m / "1" / "model.onnx") == digest
        assert sorted(p.name for p in (repo / m / "warmup").iterdir()) == ["attention_mask_ones", "presence_ones"]
    assert (repo / f"{n}_cpu/1/model.py").read_text() == (DEPLOY_DIR / "onnxruntime_cpu/model.py").read_text()
    pre = repo / f"{n}_preprocess/1"
    assert (pre / "model.py").read_text() == (DEPLOY_DIR / "preprocess/model.py").read_text()
    assert (pre / "package/manifest.json").read_bytes() == (pkg.root / "manifest.json").read_bytes()
    assert sha256_file(pre / "package/tokenizer/tokenizer.json") == pkg.manifest.files["tokenizer/tokenizer.json"]
    assert not (pre / "package/model").exists() and not (pre / "package/onnx").exists()
    for m in (f"{n}_ensemble", f"{n}_ensemble_cpu"):
        assert (repo / m / "1").is_dir() and not any((repo / m / "1").iterdir())
    assert not [p for p in repo.iterdir() if p.name.startswith(".")], "staging directories in the repository"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"], "staging directories left behind"
    assert set(configs(repo)) == set(repository_models(n)["gpu"]) | set(repository_models(n)["cpu"])


def test_rebuild_replaces_only_its_own_models(onnx_pkgs: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    build_triton_repo(onnx_pkgs["retail"], repo)
    (repo / "someone_else" / "1").mkdir(parents=True)
    build_triton_repo(onnx_pkgs["medical"], repo)
    build_triton_repo(onnx_pkgs["retail"], repo, cpu_python_backend=False, max_batch_size=8,
                      preferred_batch_sizes=(4,))
    names = {p.name for p in repo.iterdir()}
    assert "someone_else" in names
    assert {"medical-fusion_cpu", "medical-fusion_ensemble_cpu"} <= names
    assert "retail-fusion_cpu" not in names and "retail-fusion_ensemble_cpu" not in names
    assert parse(repo / "retail-fusion/config.pbtxt").max_batch_size == 8


# -- every combination parses ------------------------------------------------------------------------
@pytest.mark.parametrize("workload", ["medical", "retail"])
def test_every_config_parses_for_every_option_combination(
    onnx_pkgs: dict[str, Path], tmp_path: Path, workload: str
) -> None:
    combos = itertools.product(
        ("auto", "gpu", "cpu"), (False, True), (True, False), (True, False),
        ("latest:1", "all", "specific:1"), ((8, 16, 32), ()),
    )
    built = 0
    for i, (kind, trt, warm, cpu_models, policy, preferred) in enumerate(combos):
        repo = tmp_path / f"r{i}"
        kwargs = dict(instance_kind=kind, tensorrt=trt, warmup=warm, cpu_python_backend=cpu_models,
                      version_policy=policy, preferred_batch_sizes=preferred, instance_count=2,
                      tensorrt_cache_dir="/var/cache/trt" if trt else None)
        if trt and kind == "cpu":
            with pytest.raises(TritonRepoError, match="GPU"):
                build_triton_repo(onnx_pkgs[workload], repo, **kwargs)
            continue
        build_triton_repo(onnx_pkgs[workload], repo, **kwargs)
        cfgs = configs(repo)  # raises on anything Triton's schema would not load
        assert len(cfgs) == (5 if cpu_models else 3)
        for name, cfg in cfgs.items():
            assert cfg.name == name
            assert cfg.max_batch_size == 64
        shutil.rmtree(repo)
        built += 1
    assert built == 144 - 24  # every combination but CPU instances with TensorRT


# -- values are as asked ----------------------------------------------------------------------------
def test_values_are_as_asked(onnx_pkgs: dict[str, Path], tmp_path: Path) -> None:
    pkg = load_package(onnx_pkgs["medical"])
    n, seq = pkg.name, pkg.spec.preprocessing.text.max_length
    repo = build_triton_repo(
        pkg.root, tmp_path / "repo", max_batch_size=16, preferred_batch_sizes=(4, 8), max_queue_delay_us=500,
        instance_kind="gpu", instance_count=2, tensorrt=True, tensorrt_precision="FP16",
        tensorrt_cache_dir="/cache/trt", version_policy="specific:1", cpu_instance_count=3,
        preprocess_instance_count=4, pythonpath="/opt/mmpipe",
    )
    cfgs = configs(repo)
    m = cfgs[n]
    assert (m.platform, m.backend, m.max_batch_size) == ("onnxruntime_onnx", "onnxruntime", 16)
    assert {i.name: (i.data_type, list(i.dims)) for i in m.input} == {
        "input_ids": (model_config_pb2.TYPE_INT64, [-1]),
        "attention_mask": (model_config_pb2.TYPE_INT64, [-1]),
        "pixel_values": (model_config_pb2.TYPE_FP32, [1, 64, 64]),
        "audio_features": (model_config_pb2.TYPE_FP32, [32, 126]),
        "presence": (model_config_pb2.TYPE_FP32, [3]),
    }
    assert {o.name: list(o.dims) for o in m.output} == {"findings": [4], "report_tags": [-1, 5]}
    assert all(o.data_type == model_config_pb2.TYPE_FP32 for o in m.output)
    assert list(m.dynamic_batching.preferred_batch_size) == [4, 8]
    assert m.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in m.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)]
    assert list(m.version_policy.specific.versions) == [1]
    (acc,) = m.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt"
    params = dict(acc.parameters)
    assert params["precision_mode"] == "FP16"
    assert params["trt_engine_cache_enable"] == "1" and params["trt_engine_cache_path"] == "/cache/trt"
    assert f"input_ids:16x{seq}" in params["trt_profile_max_shapes"]
    assert "pixel_values:1x1x64x64" in params["trt_profile_min_shapes"]
    # warmup: batch 1, every input, valid data (masks of ones from files)
    (w,) = m.model_warmup
    assert w.batch_size == 1 and set(w.inputs) == {t.name for t in pkg.manifest.signature.inputs}
    assert w.inputs["input_ids"].zero_data and list(w.inputs["input_ids"].dims) == [seq]
    assert w.inputs["pixel_values"].random_data
    for name, count in (("attention_mask", seq), ("presence", 3)):
        assert w.inputs[name].input_data_file == f"{name}_ones"
        raw = (repo / n / "warmup" / f"{name}_ones").read_bytes()
        dtype = np.int64 if name == "attention_mask" else np.float32
        assert np.array_equal(np.frombuffer(raw, dtype=dtype), np.ones(count, dtype=dtype))
    # the CPU twin: same signature and batching, python backend on CPU
    c = cfgs[f"{n}_cpu"]
    assert c.backend == "python" and not c.platform
    assert [(i.name, i.data_type, list(i.dims)) for i in c.input] == [(i.name, i.data_type, list(i.dims))
                                                                      for i in m.input]
    assert list(c.output) == list(m.output)
    # the python model pads text itself, so it lets the batcher merge lengths;
    # the onnxruntime backend cannot (ragged tensors would be concatenated flat)
    assert {i.name for i in c.input if i.allow_ragged_batch} == {"input_ids", "attention_mask"}
    assert not any(i.allow_ragged_batch for i in m.input)
    assert c.dynamic_batching == m.dynamic_batching and c.model_warmup == m.model_warmup
    assert [(g.kind, g.count) for g in c.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)]
    assert c.parameters["PAD_ID"].string_value == str(pkg.text_encoder().pad_id)
    assert not c.HasField("optimization")
    # preprocess: RECORD bytes in; model inputs at the fixed text length + status out
    p = cfgs[f"{n}_preprocess"]
    assert [(i.name, i.data_type, list(i.dims)) for i in p.input] == [("RECORD", model_config_pb2.TYPE_STRING, [1])]
    pout = {o.name: (o.data_type, list(o.dims)) for o in p.output}
    assert pout["input_ids"] == (model_config_pb2.TYPE_INT64, [seq])
    assert pout["VALID"] == (model_config_pb2.TYPE_BOOL, [1])
    assert pout["ERROR"] == pout["ERROR_MESSAGE"] == (model_config_pb2.TYPE_STRING, [1])
    assert pout["TOKEN_OFFSETS"] == (model_config_pb2.TYPE_INT64, [seq, 2])
    assert p.parameters["MMPIPE_PYTHONPATH"].string_value == "/opt/mmpipe"
    assert p.parameters["ALLOWED_URI_SCHEMES"].string_value == ""
    assert [(g.kind, g.count) for g in p.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 4)]
    # ensembles: RECORD -> preprocess -> model, every model input fed, heads + status out
    for ens, target in ((f"{n}_ensemble", n), (f"{n}_ensemble_cpu", f"{n}_cpu")):
        e = cfgs[ens]
        assert e.platform == "ensemble" and e.max_batch_size == 16
        s1, s2 = e.ensemble_scheduling.step
        assert s1.model_name == f"{n}_preprocess" and dict(s1.input_map) == {"RECORD": "RECORD"}
        assert s2.model_name == target
        assert set(s2.input_map) == {i.name for i in m.input}
        assert set(s2.input_map.values()) <= set(s1.output_map.values())
        assert {o.name for o in e.output} == {"findings", "report_tags", "VALID", "ERROR", "ERROR_MESSAGE",
                                              "TOKEN_OFFSETS"}


def test_instance_kinds_and_defaults(onnx_pkgs: dict[str, Path], tmp_path: Path) -> None:
    kinds = model_config_pb2.ModelInstanceGroup
    for kind, want in (("auto", kinds.KIND_AUTO), ("cpu", kinds.KIND_CPU), ("gpu", kinds.KIND_GPU)):
        repo = build_triton_repo(onnx_pkgs["retail"], tmp_path / kind, instance_kind=kind, warmup=False)
        m = configs(repo)["retail-fusion"]
        assert [g.kind for g in m.instance_group] == [want]
        assert not m.model_warmup and not (repo / "retail-fusion" / "warmup").exists()
        assert m.version_policy.latest.num_versions == 1
        assert list(m.dynamic_batching.preferred_batch_size) == [8, 16, 32]
        assert m.dynamic_batching.max_queue_delay_microseconds == 2000
        assert not m.HasField("optimization")
    retail = configs(tmp_path / "cpu")
    # no token head, so no token offsets
    assert "TOKEN_OFFSETS" not in {o.name for o in retail["retail-fusion_preprocess"].output}
    assert "TOKEN_OFFSETS" not in {o.name for o in retail["retail-fusion_ensemble_cpu"].output}
    assert {i.name: list(i.dims) for i in retail["retail-fusion"].input}["tabular"] == [3]


# -- refusals ---------------------------------------------------------------------------------------------
def test_refuses_a_package_that_fails_verification(onnx_pkgs: dict[str, Path], tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    shutil.copytree(onnx_pkgs["retail"], pkg)
    onnx = pkg / "onnx" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"checksum mismatch for onnx/model\.onnx"):
        build_triton_repo(pkg, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_refuses_bad_options_and_non_onnx_variants(
    onnx_pkgs: dict[str, Path], tiny_packages: dict[str, Path], tmp_path: Path
) -> None:
    pkg = onnx_pkgs["retail"]
    with pytest.raises(TritonRepoError, match="not an ONNX variant"):
        build_triton_repo(pkg, tmp_path / "r", variant="torch")
    with pytest.raises(PackageError, match="no variant 'onnx-int8'"):
        build_triton_repo(pkg, tmp_path / "r", variant="onnx-int8")
    with pytest.raises(PackageError, match="no variant 'onnx-fp32'"):
        build_triton_repo(tiny_packages["media"], tmp_path / "r")
    for kwargs, match in (
        ({"preferred_batch_sizes": (8, 128)}, "preferred batch sizes"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"version_policy": "newest"}, "version_policy"),
        ({"version_policy": "specific:2,3"}, "does not serve"),
        ({"instance_kind": "tpu"}, "instance_kind"),
        ({"tensorrt": True, "tensorrt_precision": "FP8"}, "tensorrt_precision"),
        ({"model_name": "bad/name"}, "model name"),
        ({"instance_count": 0}, "instance counts"),
    ):
        with pytest.raises(TritonRepoError, match=match):
            build_triton_repo(pkg, tmp_path / "r", **kwargs)


def test_pbtxt_writer_round_trips_awkward_strings() -> None:
    awkward = 'a "quoted" \\ path\nwith é and \t tab'
    msg = {"name": "m", "backend": "python", "parameters": [{"key": "P", "value": {"string_value": awkward}}]}
    text = to_pbtxt(msg)
    assert text_format.Parse(text, MC()).parameters["P"].string_value == awkward


# -- CLI ---------------------------------------------------------------------------------------------------
def test_cli_subcommand(onnx_pkgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="mmpipe")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["triton-repo", "--package", str(onnx_pkgs["retail"]), "--out", str(tmp_path / "r"),
                              "--instance-kind", "cpu", "--instances", "2", "--preferred-batch-sizes", "2,4",
                              "--max-batch-size", "4", "--no-warmup", "--name", "shop"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "shop_ensemble_cpu" in out
    m = parse(tmp_path / "r" / "shop" / "config.pbtxt")
    assert m.max_batch_size == 4 and [g.count for g in m.instance_group] == [2]
    bad = parser.parse_args(["triton-repo", "--package", str(onnx_pkgs["retail"]), "--out", str(tmp_path / "x"),
                             "--preferred-batch-sizes", "8,lots"])
    assert bad.func(bad) == 2
    bad = parser.parse_args(["triton-repo", "--package", str(onnx_pkgs["retail"]), "--out", str(tmp_path / "x"),
                             "--instance-kind", "cpu", "--tensorrt"])
    assert bad.func(bad) == 2
    assert "tensorrt needs GPU" in capsys.readouterr().err


# -- the python-backend models' logic, without Triton ---------------------------------------------------
def test_preprocess_featurize_matches_the_predictor(onnx_pkgs: dict[str, Path]) -> None:
    """Good rows carry the Predictor's features (text padded to max_length);
    broken rows carry the Predictor's reason code and zero presence."""
    mod = load_backend_model("preprocess")
    pkg = load_package(onnx_pkgs["medical"])
    pre = Preprocessor(pkg.spec, pkg.text_encoder())
    seq = pkg.spec.preprocessing.text.max_length
    good = [record_bytes(s.record) for s in sample_data.generate("medical", 5, seed=21, missing_rate=0.3)]
    broken = sample_data.broken_records("medical")[:6]
    raws = [good[0], *[r if isinstance(r, bytes) else record_bytes(r) for r, _ in broken], *good[1:]]
    out = mod.featurize(Predictor(pkg, None), raws, seq)
    valid = out["VALID"][:, 0]
    assert valid.tolist() == [True] + [False] * len(broken) + [True] * (len(good) - 1)
    assert [e.decode() for e in out["ERROR"][1 : 1 + len(broken), 0]] == [code for _, code in broken]
    assert all(m for m in out["ERROR_MESSAGE"][1 : 1 + len(broken), 0])
    assert not out["presence"][~valid].any()
    ref = pre.collate([pre.prepare(r) for r in good])
    rows = np.flatnonzero(valid)
    for name, arr in ref.items():
        got = out[name][rows]
        if name in ("input_ids", "attention_mask"):
            assert got.shape == (len(good), seq)
            assert np.array_equal(got[:, : arr.shape[1]], arr)
            pad = pkg.text_encoder().pad_id if name == "input_ids" else 0
            assert (got[:, arr.shape[1]:] == pad).all()
        else:
            assert np.array_equal(got, arr)
    predictor = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")))
    assert [predictor.prepare(r).error.code for r in raws[1 : 1 + len(broken)]] == [code for _, code in broken]
    first = pre.prepare(good[0])
    assert [tuple(o) for o in out["TOKEN_OFFSETS"][0, : len(first.offsets)]] == first.offsets


def test_cpu_model_merges_requests_of_different_lengths(onnx_pkgs: dict[str, Path]) -> None:
    """The dynamic batcher's requests, padded together and split again, give
    what each request gives alone."""
    import onnxruntime as ort

    mod = load_backend_model("onnxruntime_cpu")
    pkg = load_package(onnx_pkgs["medical"])
    pre = Preprocessor(pkg.spec, pkg.text_encoder())
    sess = ort.InferenceSession(str(pkg.path("onnx/model.onnx")), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    recs = [s.record for s in sample_data.generate("medical", 7, seed=5, missing_rate=0.3)]
    requests = [pre.collate([pre.prepare(r) for r in chunk]) for chunk in (recs[:1], recs[1:4], recs[4:])]
    assert len({r["input_ids"].shape[1] for r in requests}) > 1, "want requests of different text lengths"
    merged = mod.merge(requests, ["input_ids", "attention_mask"], {"input_ids": pre.text.pad_id})
    outs = dict(zip(names, sess.run(names, merged)))
    parts = mod.split(outs, [len(r["presence"]) for r in requests], [r["input_ids"].shape[1] for r in requests],
                      ["report_tags"])
    for req, part in zip(requests, parts):
        alone = dict(zip(names, sess.run(names, req)))
        for n in names:
            assert part[n].shape == alone[n].shape
            np.testing.assert_allclose(part[n], alone[n], atol=1e-5)


# -- NAME_generate: the decoupled generation model ------------------------------------------------------
def test_generate_model_config_and_package_copy(generative_package: Path, tmp_path: Path) -> None:
    """A package with an exported generative head gets NAME_generate: the
    oip contract's tensors, decoupled, its settings in the parameters, and a
    package copy with exactly the files generation needs (checksums as the
    manifest's)."""
    pkg = load_package(generative_package)
    n = pkg.name
    repo = build_triton_repo(pkg.root, tmp_path / "repo", instance_kind="cpu", generate_instance_count=3,
                             generate_config=GenerateConfig(max_new_tokens=9, do_sample=True, seed=4),
                             limits=Limits(max_text_chars=500))
    cfgs = configs(repo)
    assert set(cfgs) == set(repository_models(n, generate=True)["gpu"]) | set(
        repository_models(n, generate=True)["cpu"])
    m = cfgs[f"{n}{GENERATE_SUFFIX}"]
    assert m.backend == "python" and m.max_batch_size == 0
    assert m.model_transaction_policy.decoupled
    types = {"BYTES": model_config_pb2.TYPE_STRING, "INT32": model_config_pb2.TYPE_INT32,
             "INT64": model_config_pb2.TYPE_INT64}
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in m.input] == [
        (name, types[dt], list(shape), opt) for name, dt, shape, opt in GENERATE_INPUTS]
    assert [(o.name, o.data_type, list(o.dims)) for o in m.output] == [
        (name, types[dt], [1]) for name, dt in GENERATE_OUTPUTS]
    assert [(g.kind, g.count) for g in m.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)]
    params = {k: v.string_value for k, v in m.parameters.items()}
    assert GenerateConfig.model_validate_json(params["GENERATE"]) == GenerateConfig(
        max_new_tokens=9, do_sample=True, seed=4)
    assert Limits.model_validate_json(params["LIMITS"]).max_text_chars == 500
    assert params["ALLOWED_URI_SCHEMES"] == "" and params["PACKAGE_DIR"] == "package"
    version = repo / f"{n}{GENERATE_SUFFIX}" / "1"
    assert (version / "model.py").read_text() == (DEPLOY_DIR / "generate/model.py").read_text()
    copied = sorted(str(p.relative_to(version / "package")) for p in (version / "package").rglob("*") if p.is_file())
    want = sorted({"manifest.json", "tokenizer/tokenizer.json", *pkg.variant("generate-fp32").files})
    assert copied == want, "the generate model's package copy holds other files than generation needs"
    assert (version / "package/manifest.json").read_bytes() == (pkg.root / "manifest.json").read_bytes()
    for rel in want:
        if rel != "manifest.json":
            assert sha256_file(version / "package" / rel) == pkg.manifest.files[rel]


def test_generate_model_is_optional_and_refused_without_a_head(
    generative_package: Path, onnx_pkgs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = load_package(generative_package).name
    repo = tmp_path / "repo"
    build_triton_repo(generative_package, repo)
    assert (repo / f"{name}_generate").is_dir()
    build_triton_repo(generative_package, repo, generate=False)  # a rebuild without it removes the stale one
    assert not (repo / f"{name}_generate").exists()
    build_triton_repo(onnx_pkgs["retail"], tmp_path / "r2")  # no head: no NAME_generate, nothing refused
    assert not (tmp_path / "r2" / "retail-fusion_generate").exists()
    with pytest.raises(TritonRepoError, match="no exported generative head"):
        build_triton_repo(onnx_pkgs["retail"], tmp_path / "r3", generate=True)
    with pytest.raises(TritonRepoError, match="no variant 'generate-int8'"):
        build_triton_repo(generative_package, tmp_path / "r4", generate_config=GenerateConfig(variant="int8"))
    with pytest.raises(TritonRepoError, match="instance counts"):
        build_triton_repo(generative_package, tmp_path / "r5", generate_instance_count=0)
    # CLI: settings from --config, --no-generate
    settings = tmp_path / "mmpipe.yaml"
    settings.write_text("generate:\n  max_new_tokens: 7\nlimits:\n  max_text_chars: 300\n")
    parser = argparse.ArgumentParser(prog="mmpipe")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["triton-repo", "--package", str(generative_package), "--out", str(tmp_path / "c"),
                              "--config", str(settings), "--generate-instances", "2"])
    assert args.func(args) == 0
    assert f"{name}_generate" in capsys.readouterr().out
    m = parse(tmp_path / "c" / f"{name}_generate" / "config.pbtxt")
    assert json.loads(m.parameters["GENERATE"].string_value) == {"max_new_tokens": 7}
    assert json.loads(m.parameters["LIMITS"].string_value) == {"max_text_chars": 300}
    assert [g.count for g in m.instance_group] == [2]
    args = parser.parse_args(["triton-repo", "--package", str(generative_package), "--out", str(tmp_path / "d"),
                              "--no-generate"])
    assert args.func(args) == 0
    assert f"{name}_generate" not in capsys.readouterr().out and not (tmp_path / "d" / f"{name}_generate").exists()
    settings.write_text("generate:\n  max_new_tokens: -1\n")
    args = parser.parse_args(["triton-repo", "--package", str(generative_package), "--out", str(tmp_path / "e"),
                              "--config", str(settings)])
    assert args.func(args) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_generate_model_streams_the_generators_events(generative_package: Path, tmp_path: Path) -> None:
    """The model's logic without a server: it loads the package copy with
    the config's settings and sends Generator.stream's events as the oip
    tensors, one per event; whole-call refusals raise before any."""
    mod = load_backend_model("generate")
    repo = build_triton_repo(generative_package, tmp_path / "repo", limits=Limits(max_text_chars=40))
    name = load_package(generative_package).name
    m = parse(repo / f"{name}_generate" / "config.pbtxt")
    params = {k: v.string_value for k, v in m.parameters.items()}
    gen = mod.load_generator(repo / f"{name}_generate" / "1" / "package", params, "CPU")
    assert gen.preprocessor.limits.max_text_chars == 40
    assert gen.preprocessor.media.allowed_uri_schemes == []
    samples = sample_data.generate("medical", 4, seed=7)
    raws = [record_bytes(s.record) for s in samples] + [b"not json"]
    got = list(mod.event_tensors(gen, *mod.request_inputs(np.array(raws, dtype=object), None)))
    reference = Generator(load_package(generative_package), EngineConfig(device="cpu"),
                          limits=Limits(max_text_chars=40))
    want = [token_event_tensors(ev) for ev in reference.stream(raws)]
    assert len(got) == len(want)
    codes = [g["ERROR_CODE"][0] for g in got]
    assert b"text_too_long" in codes, "the config's limits did not reach the model"
    assert any(g["FINISH_REASON"][0] for g in got), "no record was generated"
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in g:
            np.testing.assert_array_equal(g[k], w[k])
    cancelled = list(mod.event_tensors(gen, raws, None, cancelled=lambda: True))
    assert len(cancelled) == 1
    assert mod.request_inputs(np.array(raws[:1], dtype=object), np.array([3], dtype=np.int32))[1] == 3
    with pytest.raises(GenerationError, match="one value"):
        mod.request_inputs(np.array(raws[:1], dtype=object), np.array([3, 4], dtype=np.int32))
    with pytest.raises(GenerationError, match="exceeds the limit"):
        next(mod.event_tensors(gen, raws, 10_000))


def test_cpu_only_servers_load_the_generate_model(tmp_path: Path) -> None:
    """``mmpipe serve --backend triton --cpu-only`` loads the python-backend
    models, NAME_generate among them, and not the onnxruntime-backend ones."""
    from deploy.triton.server import repository_model_names

    for m in ("m", "m_cpu", "m_preprocess", "m_ensemble", "m_ensemble_cpu", "m_generate"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "config.pbtxt").write_text(f'name: "{m}"\n')
    assert repository_model_names(tmp_path, cpu_only=True) == ["m_cpu", "m_ensemble_cpu", "m_generate", "m_preprocess"]
    assert sorted(repository_models("m", generate=True)["cpu"]) == repository_model_names(tmp_path, cpu_only=True)
