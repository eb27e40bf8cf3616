"""``mmpipe serve --backend triton`` end to end: a package exported to ONNX,
``mmpipe triton-repo``, then the CLI running nvidia-pytriton's tritonserver
in the foreground on the repository's python-backend models (``--cpu-only``);
one raw record through ``NAME_ensemble_cpu`` gives the local onnxruntime
Predictor's scores, and SIGTERM stops the server and its stubs with exit 0.
Plus the clear errors (exit 2) for a missing repository or binary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="mmpipe serve --backend triton tests need nvidia-pytriton")

from pipeline.records import json_safe
from tests.compare import PROB_TOL
from tests.integration import triton_server as ts

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = "retail"


def mmpipe(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, **kw)


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``text``."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z" and int(d.name) != os.getpid():
            pids.append(int(d.name))
    return pids


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> bool:
    """The server answers /v2/health/ready and the CLI has said it is ready
    (it checks every model too; a SIGTERM before that is a stop while starting)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if "ready; SIGTERM or Ctrl-C stops" not in log.read_text(errors="replace"):
            time.sleep(0.25)
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


@pytest.fixture(scope="module")
def repo(tiny_packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(package with onnx-fp32, repository written by ``mmpipe triton-repo``)."""
    pkg = ts.onnx_package(tiny_packages[WORKLOAD], tmp_path_factory.getbasetemp() / "triton-onnx-packages")
    out = tmp_path_factory.mktemp("serve-triton") / "repo"
    res = mmpipe("triton-repo", "--package", str(pkg), "--out", str(out), "--preprocess-instances", "1")
    assert res.returncode == 0, res.stderr
    return pkg, out


def test_serve_triton_answers_like_the_local_predictor_and_stops_cleanly(repo, tmp_path) -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    from pipeline.config import EngineConfig
    from pipeline.engines import create_engine
    from pipeline.package import load_package
    from pipeline.postprocess import head_result
    from pipeline.predictor import Predictor
    from pipeline.tooling import sample_data

    pkg_dir, repo_dir = repo
    pkg = load_package(pkg_dir)
    http, grpc, metrics = ts.free_ports(3)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--backend", "triton", "--repository", str(repo_dir),
             "--cpu-only", "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--timeout", "240"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ready = wait_ready(http, proc, log, 300)
        assert ready, f"not ready (rc {proc.poll()}):\n{log.read_text(errors='replace')[-4000:]}"
        # Ready: every loaded model is, and only the python-backend ones were loaded.
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}", network_timeout=60)
        try:
            loaded = {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}
            assert loaded == {f"{pkg.name}_cpu", f"{pkg.name}_preprocess", f"{pkg.name}_ensemble_cpu"}
            record = sample_data.generate(WORKLOAD, 1, seed=5)[0].record
            raw = json.dumps(json_safe(record)).encode()
            inp = httpclient.InferInput("RECORD", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([raw], dtype=np.object_).reshape(1, 1), binary_data=True)
            heads = [h.name for h in pkg.spec.heads]
            res = client.infer(f"{pkg.name}_ensemble_cpu", [inp],
                               outputs=[httpclient.InferRequestedOutput(o) for o in [*heads, "VALID"]])
            assert bool(res.as_numpy("VALID")[0, 0])
            predictor = Predictor(pkg, create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu")))
            try:
                (want,) = predictor.predict([raw])
            finally:
                predictor.close()
            assert want.ok
            for h in pkg.spec.heads:
                got = head_result(h, res.as_numpy(h.name)[0], None)
                assert [ls.label for ls in got.labels] == [ls.label for ls in want.heads[h.name].labels]
                for label, score in want.heads[h.name].scores.items():
                    assert abs(got.scores[label] - score) <= PROB_TOL, (h.name, label)
        finally:
            client.close()
        assert processes_mentioning(str(repo_dir)), "tritonserver should be running on the repository"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := processes_mentioning(str(repo_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left running on the repository: {left}"
    text = log.read_text(errors="replace")
    assert "\nstopping\n" in text and "serving on 127.0.0.1" in text


def test_serve_triton_missing_repository_is_a_clear_error(tmp_path) -> None:
    res = mmpipe("serve", "--backend", "triton", "--repository", str(tmp_path / "nope"), "--cpu-only")
    assert res.returncode == 2
    assert "model repository not found" in res.stderr and str(tmp_path / "nope") in res.stderr
    assert "Traceback" not in res.stderr


def test_serve_triton_missing_binary_is_a_clear_error(repo, tmp_path) -> None:
    _, repo_dir = repo
    res = mmpipe("serve", "--backend", "triton", "--repository", str(repo_dir), "--cpu-only",
                 "--tritonserver", str(tmp_path / "no-such-tritonserver"))
    assert res.returncode == 2
    assert "not an executable" in res.stderr and "Traceback" not in res.stderr
    res = mmpipe("serve", "--backend", "triton", "--cpu-only")
    assert res.returncode == 2 and "--repository" in res.stderr
