"""The Serve application's pure parts: config, batching merge, metric merge,
body decoding.  The live application is tested in tests/integration/test_serve.py."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from deploy.serve.config import AppArgs, UserConfig, absolute_packages, resolve_settings
from pipeline.errors import ConfigError
from pipeline.metrics import get_metrics
from pipeline.oip import Spec

pytest.importorskip("ray.serve", reason="the Serve application needs ray[serve]")

from deploy.serve import cli
from deploy.serve.app import build_app
from deploy.serve.ingress import HttpError, _json_records, decode_content
from deploy.serve.metrics_hub import exposition
from deploy.serve.model import Failure, ModelRuntime, _TensorCall
from pipeline.engines.base import EngineUnavailable

ROOT = Path(__file__).resolve().parents[2]


# -- config ---------------------------------------------------------------------------------------
def test_example_config_is_a_valid_serve_config() -> None:
    config = cli.load_serve_config(ROOT / "deploy" / "serve" / "serve.example.yaml", base=Path("/srv"))
    schema = cli.validate(config)
    app = schema.applications[0]
    assert app.import_path == cli.BUILDER
    assert {d.name for d in app.deployments} == {"server"}
    assert config["applications"][0]["args"]["models"][0]["package"] == "/srv/demo-out/packages/retail"
    UserConfig.model_validate(app.deployments[0].user_config)
    assert config["grpc_options"]["grpc_servicer_functions"] == ["deploy.serve.grpc_oip.add_servicer"]


def test_example_config_fits_a_two_core_machine() -> None:
    """The README's example starts where a new user tries it: 2 CPUs, no GPU."""
    config = cli.load_serve_config(ROOT / "deploy" / "serve" / "serve.example.yaml")
    cli.validate(config)
    cli.check_resources(config, {"CPU": 2.0})
    need, _ = cli.resource_demand(config)
    assert need["CPU"] <= 2 and "GPU" not in need


def test_a_config_ray_cannot_place_says_what_is_short() -> None:
    config = {"applications": [{
        "name": "a", "import_path": cli.BUILDER, "args": {"models": [{"package": "/p"}]},
        "deployments": [{"name": "server", "num_replicas": 3, "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5}}],
    }]}
    cli.validate(config)
    with pytest.raises(ConfigError) as err:
        cli.check_resources(config, {"CPU": 2.0})
    msg = str(err.value)
    assert "CPU: needs 6, the Ray cluster has 2 (4 short)" in msg
    assert "GPU: needs 1.5, the Ray cluster has 0 (1.5 short)" in msg
    assert "a/server: 3 replica(s)" in msg
    # a deployment the config does not list runs at the code's default: 1 CPU
    bare = {"applications": [{"name": "a", "import_path": cli.BUILDER, "args": {"models": [{"package": "/p"}]}}]}
    assert cli.resource_demand(bare)[0] == {"CPU": 1.0}
    cli.check_resources(bare, {"CPU": 1.0})


def test_grpc_options_are_added_for_mmpipe_apps() -> None:
    config = {"applications": [{"name": "a", "import_path": cli.BUILDER, "args": {"models": [{"package": "/p"}]}}]}
    out = cli.with_grpc(config, 9123)
    assert out["grpc_options"]["port"] == 9123
    assert out["grpc_options"]["grpc_servicer_functions"] == ["deploy.serve.grpc_oip.add_servicer"]
    assert cli.with_grpc(out)["grpc_options"] == out["grpc_options"]
    other = {"applications": [{"name": "b", "import_path": "x:y"}]}
    assert "grpc_options" not in cli.with_grpc(other)


def test_invalid_configs_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications: {}\n")
    with pytest.raises(ConfigError, match="applications"):
        cli.load_serve_config(bad)
    with pytest.raises(ConfigError, match="invalid args"):
        cli.validate({"applications": [{"name": "a", "import_path": cli.BUILDER, "args": {"models": []}}]})
    with pytest.raises(ConfigError, match="invalid Serve config"):
        cli.validate({"applications": [{"name": "a"}]})


def test_serve_command_refuses_bad_configs_before_starting_ray(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"applications": [
        {"name": "a", "import_path": cli.BUILDER, "args": {"models": [{"package": "nowhere"}]}}]}))
    assert cli.main(["--config", str(cfg)]) == 2
    assert "nowhere is not a model package" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_relative_paths_become_absolute() -> None:
    args = {"models": [{"package": "pkgs/retail"}, {"package": "/abs/medical"}], "config": "settings.yaml"}
    out = absolute_packages(args, Path("/work"))
    assert out["models"] == [{"package": "/work/pkgs/retail"}, {"package": "/abs/medical"}]
    assert out["config"] == "/work/settings.yaml" and args["models"][0]["package"] == "pkgs/retail"


def test_app_args_validation() -> None:
    with pytest.raises(ValueError, match="repeated"):
        AppArgs.model_validate({"models": [{"package": "a", "name": "m"}, {"package": "b", "name": "m"}]})
    with pytest.raises(ValueError):
        AppArgs.model_validate({"models": [{"package": "a"}], "colour": "red"})
    with pytest.raises(ValueError):
        UserConfig.model_validate({"max_batch_size": 8, "batch_timeout": 1})


def test_settings_default_to_onnxruntime_and_merge(tmp_path: Path) -> None:
    args = AppArgs.model_validate({"models": [{"package": "a"}]})
    assert resolve_settings(args).engine.kind == "onnxruntime"
    f = tmp_path / "settings.yaml"
    f.write_text("engine: {kind: torch, threads: 3}\nlimits: {max_request_bytes: 1000}\n")
    args = AppArgs.model_validate({"models": [{"package": "a"}], "config": str(f),
                                   "settings": {"engine": {"threads": 2}}})
    s = resolve_settings(args)
    assert (s.engine.kind, s.engine.threads, s.limits.max_request_bytes) == ("torch", 2, 1000)


def test_one_workload_per_application() -> None:
    models = [{"package": "/a", "name": "a", "workload": "retail"},
              {"package": "/b", "name": "b", "workload": "retail"}]
    with pytest.raises(ConfigError, match="both serve workload 'retail'"):
        build_app({"models": models})
    models[1]["workload"] = "medical"
    build_app({"models": models})  # names and workloads given: no manifest read


# -- batching merge -----------------------------------------------------------------------------------
SIG_IN = [Spec("input_ids", "int64", ["batch", "sequence"]), Spec("attention_mask", "int64", ["batch", "sequence"]),
          Spec("presence", "float32", ["batch", 2])]
SIG_OUT = [Spec("cls", "float32", ["batch", 3]), Spec("tags", "float32", ["batch", "sequence", 4])]


class _Engine:
    """Records what it ran; fails on a batch holding a row whose first token is ``fail_on``."""

    name, provider = "fake", "cpu"

    def __init__(self, fail_on: int | None = None, unavailable: bool = False) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.fail_on = fail_on
        self.unavailable = unavailable

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append(feeds)
        if self.unavailable:
            raise EngineUnavailable("down")
        if self.fail_on is not None and (feeds["input_ids"][:, 0] == self.fail_on).any():
            raise RuntimeError("bad row")
        rows, seq = feeds["input_ids"].shape
        return {"cls": feeds["input_ids"][:, :3].astype(np.float32).sum(axis=1, keepdims=True).repeat(3, 1),
                "tags": np.broadcast_to(feeds["attention_mask"][:, :, None], (rows, seq, 4)).astype(np.float32)}


def _runtime(engine: _Engine) -> ModelRuntime:
    rt = object.__new__(ModelRuntime)
    rt.name, rt.labels = "m", {"path": "online", "workload": "w", "model": "m"}
    rt.metrics = get_metrics(CollectorRegistry())
    rt.predictor = type("P", (), {"engine": engine})()
    rt.inputs, rt.outputs = SIG_IN, SIG_OUT
    rt.var_axes = {s.name: tuple(i for i, d in enumerate(s.shape) if isinstance(d, str) and d != "batch")
                   for s in [*SIG_IN, *SIG_OUT]}
    rt.pad_values = {"input_ids": 0}
    rt.bind_metrics()
    return rt


def _call(rows: int, seq: int, token: int = 7) -> _TensorCall:
    feeds = {"input_ids": np.full((rows, seq), token, np.int64), "attention_mask": np.ones((rows, seq), np.int64),
             "presence": np.ones((rows, 2), np.float32)}
    return _TensorCall(0.0, feeds, {"batch": rows, "sequence": seq})


def test_merged_calls_run_once_padded_and_split_back() -> None:
    engine = _Engine()
    first, second = _runtime(engine)._engine_run([_call(2, 3), _call(1, 5)])
    assert len(engine.calls) == 1
    merged = engine.calls[0]
    assert merged["input_ids"].shape == (3, 5) and merged["presence"].shape == (3, 2)
    assert merged["input_ids"][:2, 3:].tolist() == [[0, 0], [0, 0]]  # pad id
    assert merged["attention_mask"][:2].sum(axis=1).tolist() == [3, 3]  # pads masked out
    assert first["cls"].shape == (2, 3) and first["tags"].shape == (2, 3, 4)  # cut back to the call's length
    assert second["tags"].shape == (1, 5, 4)


def test_a_call_the_engine_fails_on_is_isolated() -> None:
    engine = _Engine(fail_on=9)
    good, bad, also_good = _runtime(engine)._engine_run([_call(1, 3), _call(1, 3, token=9), _call(2, 4)])
    assert isinstance(bad, Failure) and bad.status == 500
    assert good["cls"].shape == (1, 3) and also_good["cls"].shape == (2, 3)
    assert len(engine.calls) == 4  # merged, then each call alone


def test_an_unavailable_engine_fails_every_call_at_once() -> None:
    engine = _Engine(unavailable=True)
    out = _runtime(engine)._engine_run([_call(1, 3), _call(1, 3), _call(1, 3)])
    assert all(isinstance(o, Failure) and o.status == 503 and "unavailable" in o.message for o in out)
    assert len(engine.calls) == 1  # no call-by-call retries against a dead engine


# -- metrics merge ---------------------------------------------------------------------------------------
def test_metric_snapshots_merge_with_a_replica_label() -> None:
    snaps = {}
    for replica, n in (("m#a", 2), ("m#b", 3)):
        reg = CollectorRegistry()
        m = get_metrics(reg)
        m.records.labels(path="online", workload="retail", model="m", outcome="ok").inc(n)
        m.batch_size.labels(path="online", workload="retail", model="m").observe(n)
        snaps[replica] = list(reg.collect())
    fams = {f.name: f for f in text_string_to_metric_families(exposition(snaps).decode())}
    totals = {s.labels["replica"]: s.value for s in fams["mmpipe_records"].samples if s.name.endswith("_total")}
    assert totals == {"m#a": 2.0, "m#b": 3.0}
    counts = [s for s in fams["mmpipe_batch_size"].samples if s.name.endswith("_count")]
    assert sorted(s.value for s in counts) == [1.0, 1.0]


# -- request bodies -----------------------------------------------------------------------------------------
def test_decode_content() -> None:
    body = b'{"inputs": []}' * 10
    assert decode_content(gzip.compress(body), "gzip", 1000) == body
    assert decode_content(zlib.compress(body), "deflate", 1000) == body
    assert decode_content(body, None, 1000) == body
    with pytest.raises(HttpError) as ei:
        decode_content(gzip.compress(b"\0" * 5000), "gzip", 1000)  # a small bomb stays small
    assert ei.value.status == 413
    with pytest.raises(HttpError) as ei:
        decode_content(body, "br", 1000)
    assert ei.value.status == 415
    with pytest.raises(HttpError) as ei:
        decode_content(b"not gzip", "gzip", 1000)
    assert ei.value.status == 400


def test_json_records() -> None:
    assert _json_records(b'{"id": "a", "text": "x"}') == ([{"id": "a", "text": "x"}], True)
    assert _json_records(b'{"records": [{"id": "a"}, "raw"]}') == ([{"id": "a"}, "raw"], False)
    for body, code in ((b"{", "bad_json"), (b"[1]", "bad_record"), (b'{"records": []}', "bad_record"),
                       (b'{"records": [], "x": 1}', "bad_record")):
        with pytest.raises(HttpError) as ei:
            _json_records(body)
        assert (ei.value.status, ei.value.code) == (400, code)


# -- the server's route table -----------------------------------------------------------------------
def test_route_table_finds_handlers_and_path_parameters() -> None:
    from deploy.serve.ingress import route

    assert route("POST", "/v2/models/retail-fusion/infer") == ("infer", {"name": "retail-fusion", "version": None})
    assert route("POST", "/v2/models/m/versions/3/infer") == ("infer", {"name": "m", "version": "3"})
    assert route("GET", "/v2/models/m/versions/3") == ("model_metadata", {"name": "m", "version": "3"})
    assert route("GET", "/v2/models/m_ensemble/config") == ("model_config", {"name": "m_ensemble", "version": None})
    assert route("GET", "/v2/models/m/ready") == ("model_ready", {"name": "m", "version": None})
    assert route("POST", "/v1/retail/predict") == ("predict", {"workload": "retail"})
    assert route("POST", "/v1/retail/generate") == ("generate", {"workload": "retail"})
    assert route("GET", "/v2/health/live/") == ("live", {})  # one trailing slash is ignored
    assert route("HEAD", "/v2/health/ready") == ("ready", {})  # HEAD is answered as GET
    assert route("GET", "/metrics") == ("metrics_endpoint", {})


def test_route_table_tells_wrong_methods_from_unknown_paths() -> None:
    from deploy.serve.ingress import route

    assert route("DELETE", "/v2/health/live") == ["GET"]  # 405, with what the path takes
    assert route("GET", "/v2/models/m/infer") == ["POST"]
    assert route("GET", "/v2/no/such/route") == []  # 404
    assert route("POST", "/v1/retail/predict/extra") == []
    assert route("GET", "/v2/models/a/b/c/config") == []  # a name never spans path segments
