"""The batch job on an existing two-node Ray cluster, writing to object storage.

A real cluster on this machine: ``ray start --head`` and a second ``ray
start --address=...`` with its own CPUs and a custom resource, each in a
private temp dir.  ``mmpipe batch`` runs as the Helm chart's CronJob runs it
(``RAY_ADDRESS`` set the way the chart sets it: the head's job API,
``http://HEAD:8265``, so the command runs on the cluster as a Ray job; see
``pipeline/batch/submit.py`` for why not Ray Client), and the summary must
show decode tasks and inference actors on both nodes; the output is read
back from the S3 server.  The nodes share a token (``RAY_AUTH_MODE=token``),
as a production cluster's would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.batch.output import read_errors, read_results
from pipeline.ports import free_ports
from tests.integration.batch_helpers import ROOT, sample_lines, write_jsonl
from tests.integration.test_batch_s3 import BUCKET, RUN_DATE, packages, s3  # noqa: F401  (fixtures)


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """Two Ray nodes; yields the job API address the chart would set."""
    gcs, dash = free_ports(2)
    tmp = tempfile.mkdtemp(prefix="mmray-c-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])  # the submitting client
    head = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--temp-dir={tmp}", "--resources", json.dumps({"head_node": 1})]
    worker = [_ray_bin(), "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              "--resources", json.dumps({"second_node": 1})]
    try:
        for cmd in (head, worker):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
            assert res.returncode == 0, f"{cmd[:3]} failed: {(res.stdout + res.stderr)[-3000:]}"
        yield f"http://127.0.0.1:{dash}"
    finally:
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            os.environ.pop(key, None)
        subprocess.run([_ray_bin(), "stop", "--force"], env={**env, "RAY_TMPDIR": tmp}, capture_output=True,
                       timeout=120, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_node_cluster_decodes_and_infers_on_both_nodes(cluster: str, packages, s3, tmp_path: Path) -> None:  # noqa: F811
    lines, _ = sample_lines("retail", 160, seed=21)
    write_jsonl(tmp_path / "records.jsonl", lines)
    uri = f"s3://{BUCKET}/cluster"
    cfg = tmp_path / "batch.yaml"
    cfg.write_text(yaml.safe_dump({
        "engine": {"kind": "onnxruntime", "device": "cpu", "threads": 1},
        "batch": {"batch_size": 16, "shard_bytes": 8192, "progress": False, "concurrency": 2,
                  "num_cpus": 0.5, "actor_num_cpus": 1, "output_filesystem": s3.fs_options}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": cluster}
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "--log-level", "WARNING", "batch", "-c", str(cfg),
         "--package", str(packages["retail"]), "--input", str(tmp_path / "records.jsonl"), "--output", uri,
         "--run-date", RUN_DATE, "--json"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    summary, _ = json.JSONDecoder().raw_decode(res.stdout[res.stdout.index("\n{\n") + 1:])
    assert "submitted Ray job" in res.stderr
    assert summary["records_in"] == len(lines) == summary["results"] + summary["errors"]
    assert len(summary["nodes"]["decode"]) == 2, summary["nodes"]
    assert len(summary["nodes"]["infer"]) == 2, summary["nodes"]
    assert read_results(uri, s3.fs_options).num_rows == summary["results"]
    assert read_errors(uri, s3.fs_options).num_rows == summary["errors"]
