"""The Helm chart, rendered by the real ``helm`` for every values combination
under ``helm/mmpipe/ci/`` and validated offline: core objects against the
Kubernetes OpenAPI schemas (kubernetes-validate), custom resources against
their operators' CRD schemas (jsonschema), and mmpipe's own payloads (the
Serve config and settings files) with the same code ``mmpipe`` runs."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.integration.k8s_tools import KUBE_VERSION, ToolUnavailable, crd_schemas, helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mmpipe"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "tagging"

POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return helm_binary()
    except ToolUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    try:
        return crd_schemas()
    except ToolUnavailable as exc:
        pytest.skip(str(exc))


def _run(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=300, check=False)


def render(helm: str, *values: Path, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``helm template`` -> the rendered objects (empty documents dropped)."""
    args = ["template", RELEASE, str(CHART), "--namespace", "ml", "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    res = _run(helm, *args)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def render_error(helm: str, *sets: str, values: tuple[Path, ...] = ()) -> str:
    args = ["template", RELEASE, str(CHART), "--kube-version", KUBE_VERSION]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    res = _run(helm, *args)
    assert res.returncode != 0, f"helm template should have failed for {sets}"
    return res.stderr


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every pod spec the release creates, RayService/RayJob pods included."""
    out: list[tuple[str, dict[str, Any]]] = []
    for o in objs:
        name, spec = f"{o['kind']}/{o['metadata'].get('name')}", o.get("spec", {})
        if o["kind"] in POD_OWNERS:
            out.append((name, spec["template"]["spec"]))
        elif o["kind"] == "CronJob":
            out.append((name, spec["jobTemplate"]["spec"]["template"]["spec"]))
        elif o["kind"] in ("RayService", "RayJob"):
            cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
            out.append((f"{name}/head", cluster["headGroupSpec"]["template"]["spec"]))
            out += [(f"{name}/{g['groupName']}", g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])]
            if "submitterPodTemplate" in spec:
                out.append((f"{name}/submitter", spec["submitterPodTemplate"]["spec"]))
    return out


def embedded_rayjobs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """RayJobs the batch CronJob creates at run time (kept in a ConfigMap)."""
    return [yaml.safe_load(cm["data"]["rayjob.yaml"]) for cm in by_kind(objs, "ConfigMap")
            if "rayjob.yaml" in cm.get("data", {})]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the CRD's structural schema does not declare.  The API server
    silently prunes them (``kubectl --validate=strict`` refuses them): a
    misspelled field would be lost without a word, so the test refuses it."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            if props is not None and k in props:
                out += unknown_fields(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, f"{path}.{k}")
            elif props is not None and extra is not True:
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def validate_cr(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    """A custom resource against its CRD's openAPIV3Schema (OpenAPI v3 is a
    draft-4/7 JSON Schema subset; the schemas' Go regexes are only compiled
    where an instance has the field), then the unknown-field check."""
    jsonschema.Draft7Validator(schema).validate(obj)
    extra = unknown_fields({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}, schema)
    if extra:
        raise jsonschema.ValidationError(f"fields not in the CRD schema: {extra}")


def validate_objects(objs: list[dict[str, Any]], crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    import kubernetes_validate

    for o in objs:
        key = (o["apiVersion"], o["kind"])
        where = f"{o['kind']}/{o['metadata'].get('name') or o['metadata'].get('generateName')}"
        if key in crds:
            try:
                validate_cr(o, crds[key])
            except jsonschema.ValidationError as exc:
                pytest.fail(f"{where} does not match its CRD: {exc.message} at {list(exc.absolute_path)}")
        else:
            assert "." not in o["apiVersion"].split("/")[0] or o["apiVersion"].split("/")[0].endswith(".k8s.io"), (
                f"{where}: custom resource {key} has no CRD schema to validate against")
            try:
                kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is not valid Kubernetes {KUBE_VERSION}: {exc.message} at {list(exc.path)}")


# --- every values combination -----------------------------------------------------------------------


def test_ci_values_cover_the_combinations() -> None:
    names = {p.name for p in CI_VALUES}
    for needle in ("ray", "triton", "stream", "keda", "monitoring", "gpu", "rayjob"):
        assert any(needle in n for n in names), f"no ci values file exercises {needle!r}"


def test_lint_default_values(helm: str) -> None:
    res = _run(helm, "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_lint_render_and_validate(helm: str, crds: dict, values: Path) -> None:
    res = _run(helm, "lint", "--strict", str(CHART), "-f", str(values), "--kube-version", KUBE_VERSION)
    assert res.returncode == 0, res.stdout + res.stderr
    objs = render(helm, values)
    assert objs, "nothing rendered"
    validate_objects(objs, crds)
    validate_objects(embedded_rayjobs(objs), crds)
    _check_security(objs)
    _check_probes(objs)
    _check_settings(objs)
    _check_serve_config(objs)


def _check_security(objs: list[dict[str, Any]]) -> None:
    pods = pod_specs(objs) + pod_specs(embedded_rayjobs(objs))
    assert pods
    for name, spec in pods:
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: pod may run as root"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext") or {}
            where = f"{name}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("privileged"), where
            assert "resources" in c, f"{where}: no resources"
            for env in c.get("env", []):
                # secrets by reference only: nothing that looks like a credential carries a literal value
                if any(w in env["name"].upper() for w in ("PASSWORD", "SECRET", "ACCESS_KEY", "TOKEN")):
                    assert "valueFrom" in env and "value" not in env, f"{where}: {env['name']} inlined"


def _check_probes(objs: list[dict[str, Any]]) -> None:
    expected = {"tritonserver": ("/v2/health/live", "/v2/health/ready"), "stream": ("/metrics", "/metrics")}
    for dep in by_kind(objs, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            live, ready = expected[c["name"]]
            assert c["livenessProbe"]["httpGet"]["path"] == live
            assert c["readinessProbe"]["httpGet"]["path"] == ready
            ports = {p["name"] for p in c["ports"]}
            assert c["livenessProbe"]["httpGet"]["port"] in ports


def _check_settings(objs: list[dict[str, Any]]) -> None:
    """Every rendered settings file loads with mmpipe's own Settings (no unknown keys)."""
    from pipeline.config import Settings

    for cm in by_kind(objs, "ConfigMap"):
        if "settings.yaml" in cm.get("data", {}):
            Settings.model_validate(yaml.safe_load(cm["data"]["settings.yaml"]) or {})


def _check_serve_config(objs: list[dict[str, Any]]) -> None:
    """serveConfigV2 passes the validation `mmpipe serve --config` applies (Ray's schema + mmpipe args)."""
    from deploy.serve.cli import validate

    for rs in by_kind(objs, "RayService"):
        validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))


# --- what each component renders ----------------------------------------------------------------------


def test_ray_backend(helm: str) -> None:
    objs = render(helm, CHART / "ci" / "ray-gpu-full-values.yaml")
    (rs,) = by_kind(objs, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]
    wpod = worker["template"]["spec"]
    assert worker["rayStartParams"]["num-gpus"] == "1"
    assert wpod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert wpod["runtimeClassName"] == "nvidia"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in wpod["tolerations"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "runtimeClassName" not in head and "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    # the nightly job runs against this RayService's cluster
    (cron,) = by_kind(objs, "CronJob")
    env = {e["name"]: e for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_ADDRESS"]["value"] == f"http://{RELEASE}-mmpipe-ray-head-svc:8265"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mmpipe-s3",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    kinds = {o["kind"] for o in objs}
    assert {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication",
            "NetworkPolicy", "PodDisruptionBudget"} <= kinds
    assert not by_kind(objs, "HorizontalPodAutoscaler"), "KEDA owns the stream's HPA"


def test_ray_throughput_mode(helm: str) -> None:
    """Ray Serve's throughput mode is on by default on every Ray pod, off on request; gRPC's port is open."""

    def envs(objs: list[dict[str, Any]]) -> list[dict[str, str]]:
        (rs,) = by_kind(objs, "RayService")
        cluster = rs["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]]
        return [{e["name"]: e.get("value") for e in p["containers"][0]["env"]} for p in pods]

    on = render(helm, CHART / "ci" / "ray-values.yaml")
    for env in envs(on):
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    (rs,) = by_kind(on, "RayService")
    ports = {p["name"]: p["containerPort"] for p in
             rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000
    off = render(helm, CHART / "ci" / "ray-values.yaml", sets=("online.ray.throughputMode=false",))
    for env in envs(off):
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env and "RAY_SERVE_ENABLE_HA_PROXY" not in env


def test_default_serve_config_is_the_example(helm: str) -> None:
    """The chart's Serve config is deploy/serve/serve.example.yaml (packages on the models volume)."""
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["online"]["ray"]["serveConfig"]
    example = yaml.safe_load((ROOT / "deploy" / "serve" / "serve.example.yaml").read_text())
    assert chart["http_options"] == example["http_options"]
    assert chart["grpc_options"] == example["grpc_options"]
    assert chart["proxy_location"] == example["proxy_location"]
    (capp,), eapp = chart["applications"], example["applications"][0]
    for key in ("name", "route_prefix", "import_path"):
        assert capp[key] == eapp[key]
    assert capp["args"]["settings"] == eapp["args"]["settings"]
    edeps = {d["name"]: d for d in eapp["deployments"]}
    for dep in capp["deployments"]:
        assert dep == edeps[dep["name"]], f"deployment {dep['name']} differs from the example"
    for model in capp["args"]["models"]:
        assert model["package"].startswith("/models/")


def test_triton_backend(helm: str) -> None:
    objs = render(helm, CHART / "ci" / "triton-gpu-pvc-monitoring-values.yaml")
    (dep,) = by_kind(objs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert "--model-repository=/models" in c["args"] and "--allow-gpu-metrics=true" in c["args"]
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "model-repository", "persistentVolumeClaim": {"claimName": "triton-repo", "readOnly": True}} \
        in spec["volumes"]
    assert "replicas" not in dep["spec"], "the HPA owns replicas"
    (svc,) = by_kind(objs, "Service")
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    (sm,) = by_kind(objs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    (rule,) = by_kind(objs, "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    (dash,) = [cm for cm in by_kind(objs, "ConfigMap") if "mmpipe.json" in cm.get("data", {})]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json

    assert json.loads(dash["data"]["mmpipe.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())


def test_triton_model_repository_from_object_storage(helm: str) -> None:
    objs = render(helm, CHART / "ci" / "triton-objectstorage-stream-values.yaml")
    triton = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"].endswith("-triton"))
    spec = triton["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    env = {e["name"]: e for e in init["env"]}
    assert env["MODEL_REPOSITORY_URI"]["value"] == "s3://models/triton-repo"
    assert "valueFrom" in env["AWS_ACCESS_KEY_ID"]
    assert {"name": "model-repository", "mountPath": "/models"} in init["volumeMounts"]
    # two input topics: KEDA is off here, the HPA is capped by partitions
    (hpa,) = [h for h in by_kind(objs, "HorizontalPodAutoscaler") if h["metadata"]["name"].endswith("-stream")]
    assert hpa["spec"]["maxReplicas"] == 12


def test_image_backed_triton_mounts_nothing_over_the_repository(helm: str) -> None:
    objs = render(helm, CHART / "ci" / "triton-values.yaml")
    (dep,) = by_kind(objs, "Deployment")
    mounts = [m["mountPath"] for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert "/models" not in mounts


def test_stream_consumer_and_keda(helm: str) -> None:
    objs = render(helm, CHART / "ci" / "ray-gpu-full-values.yaml")
    dep = next(d for d in by_kind(objs, "Deployment") if d["metadata"]["name"].endswith("-stream"))
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["stream", "--config", "/etc/mmpipe/settings.yaml"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MMPIPE__METRICS__PORT"]["value"] == "9108"
    assert env["MMPIPE__STREAM__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kafka-mmpipe", "key": "sasl-password"}
    assert {"name": "kafka-tls", "mountPath": "/etc/mmpipe/kafka-tls", "readOnly": True} in c["volumeMounts"]
    (so,) = by_kind(objs, "ScaledObject")
    trig = so["spec"]["triggers"][0]
    assert so["spec"]["maxReplicaCount"] == 6  # 0 -> the topic's partitions
    assert trig["metadata"]["bootstrapServers"] == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert trig["metadata"]["consumerGroup"] == "retail-tagger"
    assert trig["metadata"]["topic"] == "retail-records"
    assert trig["metadata"]["allowIdleConsumers"] == "false"
    (ta,) = by_kind(objs, "TriggerAuthentication")
    assert {r["parameter"] for r in ta["spec"]["secretTargetRef"]} == {"sasl", "username", "password", "tls", "ca"}
    (pm,) = [p for p in by_kind(objs, "PodMonitor") if p["metadata"]["name"].endswith("-stream")]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize("sets, message", [
    (("stream.replicas=5", "stream.partitions=4"), "exceeds stream.partitions"),
    (("stream.keda.enabled=true", "stream.keda.maxReplicaCount=8", "stream.partitions=4"), "exceeds stream.partitions"),
    (("stream.hpa.enabled=true", "stream.hpa.maxReplicas=9", "stream.partitions=4"), "exceeds stream.partitions"),
])
def test_stream_replicas_never_exceed_partitions(helm: str, sets: tuple[str, ...], message: str) -> None:
    err = render_error(helm, *sets, values=(CHART / "ci" / "stream-keda-values.yaml",))
    assert message in err


def test_nightly_batch_cronjob_and_rayjob(helm: str, crds: dict) -> None:
    objs = render(helm, CHART / "ci" / "batch-rayjob-values.yaml")
    (cron,) = by_kind(objs, "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["schedule"] == "30 1 * * *" and spec["timeZone"] == "Europe/Berlin"
    assert spec["successfulJobsHistoryLimit"] == 3 and spec["failedJobsHistoryLimit"] == 3
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == f"{RELEASE}-mmpipe-batch-submitter"
    (role,) = by_kind(objs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                              "verbs": ["create", "get", "list", "watch"]}]
    (job,) = embedded_rayjobs(objs)
    assert job["spec"]["entrypoint"] == ("mmpipe 'batch' '--config' '/etc/mmpipe/settings.yaml' '--input' "
                                         "'s3://catalogue/incoming/' '--output' 's3://catalogue/tags/' '--no-progress'")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    settings_cm = next(cm for cm in by_kind(objs, "ConfigMap") if cm["metadata"]["name"].endswith("batch-settings"))
    settings = yaml.safe_load(settings_cm["data"]["settings.yaml"])
    assert settings["batch"]["pushgateway_url"] == "http://pushgateway.monitoring:9091"


def test_batch_needs_a_ray_cluster(helm: str) -> None:
    err = render_error(helm, "batch.enabled=true", "batch.input=/data/in", "batch.output=/data/out")
    assert "batch.rayAddress" in err


@pytest.mark.parametrize("sets, message", [
    (("batch.concurrencyPolicy=Allow",), "concurrencyPolicy"),
    (("securityContext.readOnlyRootFilesystem=false",), "readOnlyRootFilesystem"),
    (("securityContext.allowPrivilegeEscalation=true",), "allowPrivilegeEscalation"),
    (("online.backend=kserve",), "backend"),
    (("online.triton.modelRepository.source=http",), "source"),
    (("stream.partitions=0",), "partitions"),
    (("unknownKey=1",), "unknownKey"),
])
def test_values_schema_rejects(helm: str, sets: tuple[str, ...], message: str) -> None:
    err = render_error(helm, *sets)
    assert "values don't meet the specifications of the schema" in err and message in err


def test_crd_validation_can_fail(helm: str, crds: dict) -> None:
    """A RayService with a misspelled field is caught: the CRD check is real."""
    objs = render(helm, CHART / "ci" / "ray-values.yaml")
    (rs,) = by_kind(objs, "RayService")
    schema = crds[("ray.io/v1", "RayService")]
    validate_cr(rs, schema)
    bad_type = yaml.safe_load(yaml.safe_dump(rs))
    bad_type["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"] = {"num-cpus": 0}  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        validate_cr(bad_type, schema)
    typo = yaml.safe_load(yaml.safe_dump(rs))
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate_cr(typo, schema)
