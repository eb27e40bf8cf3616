"""Every mmpipe pod gets the record-id pseudonym key from a Secret, never inlined."""

from __future__ import annotations

from tests.integration.test_helm import CHART, helm, pod_specs, render  # noqa: F401  (helm: a fixture)


def test_every_pod_reads_the_id_hash_key_from_the_secret(helm: str) -> None:  # noqa: F811
    values = [CHART / "ci" / "ray-values.yaml", CHART / "ci" / "stream-keda-values.yaml"]
    objs = [o for v in values for o in render(helm, v, sets=("privacy.idHashKeySecret=mmpipe-ids",))]
    pods = pod_specs(objs)
    assert pods
    for owner, spec in pods:
        for c in spec.get("containers", []):
            env = {e["name"]: e for e in c.get("env", [])}
            assert "MMPIPE_ID_HASH_KEY" in env, f"{owner}/{c['name']} has no id-hash key"
            ref = env["MMPIPE_ID_HASH_KEY"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "mmpipe-ids", "key": "id-hash-key"}
            assert "value" not in env["MMPIPE_ID_HASH_KEY"]


def test_no_key_env_without_a_secret(helm: str) -> None:  # noqa: F811
    objs = render(helm, CHART / "ci" / "ray-values.yaml")
    for _, spec in pod_specs(objs):
        for c in spec.get("containers", []):
            assert "MMPIPE_ID_HASH_KEY" not in {e["name"] for e in c.get("env", [])}
