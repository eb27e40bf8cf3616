"""Online serving under concurrent load: Ray Serve vs Triton, dynamic batching
vs none, and what a server costs over calling the model in-process.

One run, one model, one set of records, everything side by side:

* **in-process reference**: the same ONNX Runtime session settings called
  directly (batch 1, 8, 32, 64 on the records' tensors), and the Predictor on
  the raw records (decode + model + postprocess), in this process;
* **Ray Serve** (the real ``deploy/serve`` app under ``mmpipe serve``, a local
  Ray with ``--num-cpus``) as two applications of one Serve config: ``/b``
  with dynamic batching (``max_batch_size``, ``batch_wait_timeout_s``) and
  ``/u`` with ``max_batch_size: 1``;
* **Triton** (the real tritonserver through ``deploy/triton/server.py``, a
  repository written by ``exporters.triton_repo``): the CPU python-backend
  onnxruntime model ``NAME_cpu`` with the same dynamic batching, and a copy
  ``NAME-nobatch_cpu`` with ``max_batch_size: 1``;
* **Ray Serve with no model** (``bench/serve_echo.py``, a third application
  of the same Serve config at ``/e``): proxy -> ingress -> handle call, as
  mmpipe's path, answering at once; what Ray Serve itself costs per request.

Both servers run at once, so their cells interleave (client count by client
count) and share the same background load.  The CPU budget is the same for
both: one model instance with one ONNX Runtime intra-op thread (the
in-process reference too); each server's own HTTP / routing threads are not
pinned.  The load generator is a separate process (asyncio, one HTTP
connection per client, closed loop: a client sends its next request when
its last one is answered), using the same ``tritonclient`` code against both
servers' Open Inference Protocol ``/v2/models/{name}/infer``, one record per
request; the friendly ``/v1/{workload}/predict`` (raw record JSON) is
measured on Ray Serve at ``--v1-clients``.  Each cell warms up, then counts
the answers completed in a fixed window.  Every cell also records CPU time
(load generator, each server's process tree, the rest of the machine) and
the mean batch the server really ran, so the numbers can be read on a
shared machine.

    python bench/serving.py                  # full run (about 6-9 minutes on 2 cores)
    python bench/serving.py --quick          # 1 and 8 clients, short windows
    python bench/serving.py --clients 1,64 --duration 10

Writes bench/results/serving.json and bench/results/serving.png
(``--quick`` writes serving-quick.*, so a smoke run never replaces the results).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.ports import free_port  # noqa: E402  (after the repo is on the path)

OUT = ROOT / "bench" / "results"
RAY_BATCHED, RAY_UNBATCHED, RAY_ECHO = "/b", "/u", "/e"
NOBATCH_SUFFIX = "-nobatch"
CHECK_RECORDS = 16
CHECK_TOL = 1e-4
"""Largest |logit difference| a server may show against the in-process session
on the check records (same ONNX file, same fp32 kernels: differences are
rounding only)."""


# -- data shared with the load generator --------------------------------------------------------------
@dataclass
class Target:
    """One thing the load generator hits."""

    key: str          # e.g. "ray/v2/batched"
    server: str       # "ray" | "triton"
    api: str          # "v2" | "v1" | "echo" (bench/serve_echo.py: Ray Serve's path, no model)
    batching: bool
    base: str         # host:port[/prefix]
    model: str        # v2: model name; v1: workload
    metrics_url: str
    tree_pid: int     # root of the server's process tree (CPU accounting)
    protocol: str = "http"   # "http" | "grpc" (v2 only)
    app: str = ""            # Ray Serve gRPC: the application header (several apps on one proxy)


# -- CPU accounting -------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds) of every process (from /proc)."""
    out: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        rest = text.rsplit(")", 1)[-1].split()
        try:
            out[int(stat.parent.name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK)
        except (IndexError, ValueError):
            continue
    return out


def tree_pids(procs: dict[int, tuple[int, float]], root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, stack, seen = [], [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in procs:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def process_name(pid: int) -> str:
    """A stable short name: Ray actors by class and deployment (their
    command line also names the method running now), else the program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode("utf-8", "replace").strip()
    if first.startswith("ray::"):
        return first.split(".", 1)[0]
    name = Path(first.split()[0]).name if first else "?"
    if name.startswith("python") and len(argv) > 2 and argv[1] == b"-m":
        return f"python -m {argv[2].decode('utf-8', 'replace')}"
    return name


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(v) for v in fields]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / _TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_snapshot(trees: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far: each server's process tree (in total and per
    process, ``proc:SERVER:PID:NAME``), this process, the whole machine."""
    procs = proc_cpu()
    snap: dict[str, float] = {}
    for k, root in trees.items():
        pids = tree_pids(procs, root)
        snap[f"tree:{k}"] = sum(procs[p][1] for p in pids)
        for p in pids:
            snap[f"proc:{k}:{p}:{process_name(p)}"] = procs[p][1]
    snap["client"] = self_cpu()
    snap["machine"] = machine_busy()
    snap["t"] = time.perf_counter()
    return snap


# -- server-side batch sizes ------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)\s*$")


def scrape(url: str, names: tuple[str, ...], label: str | None = None) -> dict[str, float]:
    """Sum of each named series (optionally only samples whose labels contain
    ``label``) at a Prometheus endpoint; {} when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return {}
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in out and (label is None or label in (m.group(2) or "")):
            out[m.group(1)] += float(m.group(3))
    return out


def batch_counters(t: Target) -> dict[str, float]:
    """(rows, engine calls) so far: Ray's mmpipe_batch_size histogram, Triton's
    nv_inference_count / nv_inference_exec_count of the model."""
    if t.api == "echo":
        return {}
    if t.server.startswith("ray"):
        s = scrape(t.metrics_url, ("mmpipe_batch_size_sum", "mmpipe_batch_size_count"))
        return {"rows": s.get("mmpipe_batch_size_sum", 0.0), "calls": s.get("mmpipe_batch_size_count", 0.0)}
    s = scrape(t.metrics_url, ("nv_inference_count", "nv_inference_exec_count"), label=f'model="{t.model}"')
    return {"rows": s.get("nv_inference_count", 0.0), "calls": s.get("nv_inference_exec_count", 0.0)}


# -- the load generator (its own process) -------------------------------------------------------------------
class LoadGen:
    """Holds the request payloads; runs checks and cells on request."""

    def __init__(self, data_dir: str) -> None:
        import tritonclient.http as httpclient

        d = Path(data_dir)
        meta = json.loads((d / "meta.json").read_text())
        arrays = np.load(d / "tensors.npz")
        self.n = meta["records"]
        self.outputs: list[str] = meta["outputs"]
        self.inputs: list[list[Any]] = []
        self.feeds: list[dict[str, np.ndarray]] = []
        for i in range(self.n):
            feeds = {name: arrays[f"{i}/in/{name}"] for name in meta["inputs"]}
            self.feeds.append(feeds)
            row = []
            for name, arr in feeds.items():
                inp = httpclient.InferInput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32")
                inp.set_data_from_numpy(arr, binary_data=True)
                row.append(inp)
            self.inputs.append(row)
        import tritonclient.grpc as grpcclient

        self.ginputs: list[list[Any]] = []
        for feeds in self.feeds:
            row = []
            for name, arr in feeds.items():
                inp = grpcclient.InferInput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32")
                inp.set_data_from_numpy(arr)
                row.append(inp)
            self.ginputs.append(row)
        self.grequested = [grpcclient.InferRequestedOutput(n) for n in self.outputs]
        self.ref = [{name: arrays[f"{i}/out/{name}"] for name in self.outputs} for i in range(self.n)]
        self.requested = [httpclient.InferRequestedOutput(n, binary_data=True) for n in self.outputs]
        self.bodies = [b.encode() for b in json.loads((d / "v1.json").read_text())]
        self.raw = [b"".join(np.ascontiguousarray(a).tobytes() for a in f.values()) for f in self.feeds]

    # one request ---------------------------------------------------------------------------------
    async def _v2(self, client: Any, t: Target, i: int) -> dict[str, np.ndarray]:
        if t.protocol == "grpc":
            res = await client.infer(t.model, self.ginputs[i], outputs=self.grequested,
                                     headers={"application": t.app} if t.app else None)
        else:
            res = await client.infer(t.model, self.inputs[i], outputs=self.requested)
        return {n: res.as_numpy(n) for n in self.outputs}

    async def _v1(self, session: Any, t: Target, i: int) -> list[dict[str, Any]]:
        async with session.post(f"http://{t.base}/v1/{t.model}/predict", data=self.bodies[i],
                                headers={"content-type": "application/json"}) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {body[:200].decode('utf-8', 'replace')}")
            return json.loads(body)

    async def _echo(self, session: Any, t: Target, i: int) -> bytes:
        """The tensors' bytes (the size of a binary /v2 body) to the echo app."""
        async with session.post(f"http://{t.base}/", data=self.raw[i]) as r:
            body = await r.read()
            if r.status != 200 or body != b"ok":
                raise RuntimeError(f"HTTP {r.status}: {body[:200].decode('utf-8', 'replace')}")
            return body

    async def _send(self, conn: Any, t: Target, i: int) -> Any:
        if t.api == "v2":
            return await self._v2(conn, t, i)
        if t.api == "v1":
            return await self._v1(conn, t, i)
        return await self._echo(conn, t, i)

    def _client(self, t: Target) -> Any:
        import aiohttp
        import tritonclient.http.aio as aioclient

        if t.api == "v2" and t.protocol == "grpc":
            import tritonclient.grpc.aio as grpcaio

            return grpcaio.InferenceServerClient(t.base)
        if t.api == "v2":
            return aioclient.InferenceServerClient(t.base, conn_limit=1, conn_timeout=300.0)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                     timeout=aiohttp.ClientTimeout(total=300.0))

    async def _close(self, client: Any) -> None:
        await client.close()

    # the check ------------------------------------------------------------------------------------
    async def check(self, t: Target) -> dict[str, Any]:
        """Every check record once: the server must give the in-process
        session's logits (v2) or a result without error (v1)."""
        client = self._client(t)
        worst, failed = 0.0, 0
        try:
            for i in range(min(CHECK_RECORDS, self.n)):
                if t.api == "v2":
                    got = await self._v2(client, t, i)
                    for n in self.outputs:
                        worst = max(worst, float(np.max(np.abs(got[n].astype(np.float64) - self.ref[i][n]))))
                elif t.api == "echo":
                    await self._echo(client, t, i)
                else:
                    res = (await self._v1(client, t, i))
                    res = res if isinstance(res, list) else res.get("results", [res])
                    failed += sum(1 for r in res if r.get("error"))
        finally:
            await self._close(client)
        ok = worst <= CHECK_TOL and failed == 0
        return {"target": t.key, "max_abs_logit_diff": worst if t.api == "v2" else None,
                "records": min(CHECK_RECORDS, self.n), "errors": failed, "ok": ok}

    # a cell ------------------------------------------------------------------------------------------------
    async def cell(self, t: Target, clients: int, warmup_s: float, duration_s: float,
                   trees: dict[str, int]) -> dict[str, Any]:
        conns = [self._client(t) for _ in range(clients)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        t_measure, t_end = start + warmup_s, start + warmup_s + duration_s
        lat: list[float] = []
        errors: list[str] = []
        snaps: dict[str, dict[str, float]] = {}
        counters = {"before": await asyncio.to_thread(batch_counters, t)}

        async def worker(k: int, conn: Any) -> None:
            i = (k * 7) % self.n
            while loop.time() < t_end:
                t0 = loop.time()
                try:
                    await self._send(conn, t, i)
                except Exception as exc:  # counted and reported, the run goes on
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    else:
                        errors.append("")
                    await asyncio.sleep(0.01)
                    continue
                t1 = loop.time()
                if t_measure <= t1 <= t_end:
                    lat.append(t1 - t0)
                i = (i + 1) % self.n

        async def sampler() -> None:
            await asyncio.sleep(max(0.0, t_measure - loop.time()))
            snaps["start"] = cpu_snapshot(trees)
            await asyncio.sleep(max(0.0, t_end - loop.time()))
            snaps["end"] = cpu_snapshot(trees)

        try:
            await asyncio.gather(sampler(), *(worker(k, c) for k, c in enumerate(conns)))
        finally:
            for c in conns:
                with contextlib.suppress(Exception):
                    await self._close(c)
        if t.server == "ray" and t.api != "echo":
            await asyncio.sleep(1.2)  # replicas push metric snapshots every 0.5 s
        counters["after"] = await asyncio.to_thread(batch_counters, t)
        a, b = snaps["start"], snaps["end"]
        wall = b["t"] - a["t"]
        cores = {k: (b[k] - a[k]) / wall for k in a if k != "t" and k in b}
        by_name: dict[str, float] = {}
        for k, v in cores.items():
            if k.startswith(f"proc:{t.server}:"):
                name = k.split(":", 3)[3]
                by_name[name] = by_name.get(name, 0.0) + v
        busiest = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:5])
        ms = np.array(lat) * 1e3
        rows = counters["after"].get("rows", 0) - counters["before"].get("rows", 0)
        calls = counters["after"].get("calls", 0) - counters["before"].get("calls", 0)
        own = f"tree:{t.server}"
        peers = sum(v for k, v in cores.items() if k.startswith("tree:") and k != own)
        trees_total = sum(v for k, v in cores.items() if k.startswith("tree:"))
        return {
            "target": t.key, "server": t.server, "api": t.api, "batching": t.batching, "clients": clients,
            "requests": len(lat), "errors": len(errors), "error_samples": [e for e in errors if e][:5],
            "records_per_s": len(lat) / wall,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "mean_ms": float(ms.mean()) if len(ms) else None,
            "mean_batch": rows / calls if calls else None,
            "cores": {"client": cores["client"], "server": cores.get(own, 0.0), "peer_server_idle": peers,
                      "others": max(0.0, cores["machine"] - cores["client"] - trees_total),
                      "machine": cores["machine"]},
            "server_processes_cores": {k: round(v, 3) for k, v in busiest.items()},
            "server_cpu_ms_per_request": 1e3 * cores.get(own, 0.0) * wall / len(lat) if lat else None,
            "client_cpu_ms_per_request": 1e3 * cores["client"] * wall / len(lat) if lat else None,
            "window_s": wall,
        }


def loadgen_main(conn: Any, data_dir: str) -> None:
    """Entry point of the load-generator process: one command per message."""
    gen = LoadGen(data_dir)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        op, kw = msg
        try:
            t = Target(**kw.pop("target"))
            if op == "check":
                conn.send(("ok", asyncio.run(gen.check(t))))
            else:
                conn.send(("ok", asyncio.run(gen.cell(t, **kw))))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# -- servers ----------------------------------------------------------------------------------------------
@dataclass
class RayServe:
    proc: subprocess.Popen
    port: int
    grpc_port: int
    log: Path
    ray_tmp: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the Ray daemons it started
                self.proc.wait(10)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def ray_config(package: Path, port: int, grpc_port: int, batch: int, wait_s: float, threads: int
               ) -> dict[str, Any]:
    """Serve config: the same package as two applications, batched (``/b``)
    and not (``/u``), each one ``server`` replica (HTTP, gRPC and the model)
    with ``threads`` ORT threads; and ``/e``, the same request path with no
    model (bench/serve_echo.py)."""
    settings = {"engine": {"kind": "onnxruntime", "device": "cpu", "variant": "fp32", "threads": threads},
                "predict": {"batch_size": max(batch, 1)}, "log_level": "INFO"}

    def app(name: str, prefix: str, max_batch: int) -> dict[str, Any]:
        return {
            "name": name, "route_prefix": prefix, "import_path": "deploy.serve.app:build_app",
            "args": {"models": [{"package": str(package)}], "settings": settings},
            "deployments": [
                {"name": "server", "num_replicas": 1, "max_ongoing_requests": 512,
                 "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0},
                 "user_config": {"max_batch_size": max_batch, "batch_wait_timeout_s": wait_s}},
            ],
        }

    return {"proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": 300},
            "grpc_options": {"port": grpc_port},
            "applications": [
                app("batched", RAY_BATCHED, batch), app("unbatched", RAY_UNBATCHED, 1),
                {"name": "echo", "route_prefix": RAY_ECHO, "import_path": "bench.serve_echo:build_echo_app",
                 "args": {}, "deployments": [  # the same queue limit as mmpipe's server above
                     {"name": "echo", "num_replicas": 1, "max_ongoing_requests": 512}]},
            ]}


def start_ray(package: Path, work: Path, num_cpus: int, batch: int, wait_s: float, threads: int,
              throughput_mode: str) -> RayServe:
    """``mmpipe serve --throughput-mode MODE`` in a subprocess (returns at once; see wait_ray)."""
    import yaml

    port, grpc_port = free_port(), free_port()
    cfg = ray_config(package, port, grpc_port, batch, wait_s, threads)
    (work / f"serve-{throughput_mode}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    ray_tmp = Path(tempfile.mkdtemp(prefix="mmb", dir="/tmp"))  # Ray's socket paths must stay short
    log = work / f"serve-{throughput_mode}.log"
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.serve.cli", "--config", str(work / f"serve-{throughput_mode}.yaml"),
             "--num-cpus", str(num_cpus), "--throughput-mode", throughput_mode],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    return RayServe(proc, port, grpc_port, log, ray_tmp)


def wait_ray(srv: RayServe, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not re.search(r"^ready", srv.log.read_text(errors="replace"), re.M):
        if srv.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mmpipe serve did not start (rc={srv.proc.poll()}):\n"
                               f"{srv.log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


def build_triton(package: Path, repo: Path, batch: int, wait_s: float, threads: int) -> tuple[str, str]:
    """Two CPU python-backend models of the package: batched (the repository
    writer's dynamic batching, ``batch`` rows, ``wait_s`` queue delay) and
    ``max_batch_size: 1``.  Both get ``threads`` ORT intra-op threads (the
    writer's default, 0, lets ORT take every core)."""
    from exporters.triton_repo import build_triton_repo
    from pipeline.package import load_package

    name = load_package(package).name
    build_triton_repo(package, repo, max_batch_size=batch, preferred_batch_sizes=(),
                      max_queue_delay_us=int(wait_s * 1e6), cpu_instance_count=1)
    build_triton_repo(package, repo, max_batch_size=1, preferred_batch_sizes=(), max_queue_delay_us=0,
                      cpu_instance_count=1, model_name=name + NOBATCH_SUFFIX)
    models = (f"{name}_cpu", f"{name}{NOBATCH_SUFFIX}_cpu")
    for m in models:
        cfg = repo / m / "config.pbtxt"
        text, n = re.subn(r'(key: "ORT_INTRA_OP_THREADS"\s*value \{\s*string_value: )"0"',
                          rf'\1"{threads}"', cfg.read_text())
        if n != 1:
            raise RuntimeError(f"could not set ORT_INTRA_OP_THREADS in {cfg}")
        cfg.write_text(text)
    return models


# -- in-process reference ---------------------------------------------------------------------------------
def _timed(fn: Any, items: list[Any], seconds: float) -> list[float]:
    """Call ``fn`` on items round-robin for ``seconds`` (after one warm-up
    pass); the per-call latencies."""
    for it in items[: min(len(items), 4)]:
        fn(it)
    out: list[float] = []
    end = time.perf_counter() + seconds
    k = 0
    while time.perf_counter() < end or len(out) < 5:
        t = time.perf_counter()
        fn(items[k % len(items)])
        out.append(time.perf_counter() - t)
        k += 1
    return out


def inprocess(predictor: Any, raws: list[dict], prepared: list[Any], batches: list[int], seconds: float
              ) -> list[dict[str, Any]]:
    """The model called in-process: the engine on collated tensors (what a
    server's engine call costs) and the Predictor on raw records."""
    rows = []
    engine, pre = predictor.engine, predictor.pre
    for b in batches:
        feeds = [pre.collate(prepared[i : i + b]) for i in range(0, len(prepared) - b + 1, b)]
        lat = _timed(engine.run, feeds, seconds)
        rows.append(_row("engine", b, lat))
    for b in (1, max(batches)):
        chunks = [raws[i : i + b] for i in range(0, len(raws) - b + 1, b)]
        lat = _timed(predictor.predict, chunks, seconds)
        rows.append(_row("predictor", b, lat))
    return rows


def _row(what: str, batch: int, lat: list[float]) -> dict[str, Any]:
    ms = np.array(lat) * 1e3
    return {"what": what, "batch": batch, "calls": len(lat), "records_per_s": batch * len(lat) / sum(lat),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# -- summary -------------------------------------------------------------------------------------------------
def _cell(cells: list[dict], target: str, clients: int) -> dict | None:
    return next((c for c in cells if c["target"] == target and c["clients"] == clients), None)


def _aim(name: str, value: float | None, target: float, higher: bool = True) -> dict[str, Any]:
    met = value is not None and (value >= target if higher else value <= target)
    return {"name": name, "value": value, "target": target, "met": bool(met)}


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The ratios the run is about, from cells measured side by side, and
    the aims (at the top client count) in the benchmarks' one shape."""
    cells, ref = result["cells"], result["inprocess"]
    top = max(result["config"]["clients"])
    best_mode = result["config"]["throughput_modes"][0]
    ray = f"ray-tm-{best_mode}"
    out: dict[str, Any] = {"batching_speedup": {}, "ray_over_triton": {}, "throughput_mode_on_over_off": {},
                           "ray_over_inprocess": {}, "ray_vs_echo": {}}
    for c in result["config"]["clients"]:
        for srv in ("ray-tm-on", "ray-tm-off", "triton"):
            for proto in ("http", "grpc"):
                on, off = _cell(cells, f"{srv}/{proto}/batched", c), _cell(cells, f"{srv}/{proto}/unbatched", c)
                if on and off and off["records_per_s"]:
                    out["batching_speedup"].setdefault(f"{srv}/{proto}", {})[str(c)] = (
                        on["records_per_s"] / off["records_per_s"])
        for proto in ("http", "grpc"):
            for mode in ("batched", "unbatched"):
                r, t = _cell(cells, f"{ray}/{proto}/{mode}", c), _cell(cells, f"triton/{proto}/{mode}", c)
                if r and t and t["records_per_s"]:
                    out["ray_over_triton"].setdefault(f"{proto}/{mode}", {})[str(c)] = r["records_per_s"] / t[
                        "records_per_s"]
                on, off = _cell(cells, f"ray-tm-on/{proto}/{mode}", c), _cell(cells, f"ray-tm-off/{proto}/{mode}", c)
                if on and off and off["records_per_s"]:
                    out["throughput_mode_on_over_off"].setdefault(f"{proto}/{mode}", {})[str(c)] = (
                        on["records_per_s"] / off["records_per_s"])
        r, e = _cell(cells, f"{ray}/http/unbatched", c), _cell(cells, f"{ray}/echo", c)
        if r and e and e["records_per_s"]:
            out["ray_vs_echo"][str(c)] = {
                "throughput": r["records_per_s"] / e["records_per_s"],
                "server_cpu_ms_per_request": r["server_cpu_ms_per_request"],
                "echo_server_cpu_ms_per_request": e["server_cpu_ms_per_request"],
            }
    eng1 = next(r for r in ref if r["what"] == "engine" and r["batch"] == 1)
    pred1 = next((r for r in ref if r["what"] == "predictor" and r["batch"] == 1), None)
    one = _cell(cells, f"{ray}/http/unbatched", 1)
    if one:
        out["ray_over_inprocess"]["v2_one_client_added_p50_ms_over_engine"] = one["p50_ms"] - eng1["p50_ms"]
    v1one = _cell(cells, f"{ray}/v1/batched", 1) or _cell(cells, f"{ray}/v1/unbatched", 1)
    if pred1 and v1one:
        out["ray_over_inprocess"]["v1_one_client_added_p50_ms_over_predictor"] = v1one["p50_ms"] - pred1["p50_ms"]
    aims = []
    for proto in ("http", "grpc"):
        aims.append(_aim(f"ray_serve_over_triton_{proto}_batched_{top}_clients",
                         out["ray_over_triton"].get(f"{proto}/batched", {}).get(str(top)), 0.5))
    aims.append(_aim(f"ray_serve_batching_speedup_http_{top}_clients",
                     out["batching_speedup"].get(f"{ray}/http", {}).get(str(top)), 2.0))
    busy = _cell(cells, f"{ray}/http/batched", top)
    aims.append(_aim(f"ray_serve_server_cpu_ms_per_request_http_batched_{top}_clients",
                     busy["server_cpu_ms_per_request"] if busy else None, 1.5, higher=False))
    aims.append(_aim("ray_serve_one_client_added_p50_ms_over_inprocess_predictor",
                     out["ray_over_inprocess"].get("v1_one_client_added_p50_ms_over_predictor"), 3.0, higher=False))
    out["aims"] = aims
    return out


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    clients = result["config"]["clients"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colours = {"ray-tm-on": "tab:blue", "ray-tm-off": "tab:cyan", "triton": "tab:green"}
    for key in sorted({c["target"] for c in cells}):
        pts = [(c, _cell(cells, key, c)) for c in clients]
        pts = [(c, x) for c, x in pts if x and x["requests"]]
        if len(pts) < 2:
            continue
        srv = key.split("/")[0]
        ls = "-" if key.endswith("/batched") else "--" if key.endswith("/unbatched") else ":"
        marker = "s" if "/grpc/" in key else "o"
        xs = [c for c, _ in pts]
        for ax, field in zip(axes, ("records_per_s", "p50_ms", "p99_ms"), strict=True):
            ax.plot(xs, [x[field] for _, x in pts], ls, color=colours.get(srv, "tab:red"), marker=marker,
                    label=key)
    for ax, title in zip(axes, ("throughput (records/s)", "p50 latency (ms)", "p99 latency (ms)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"Online serving, {result['config']['model']} ({result['machine']['cpus']} CPU cores shared "
                 "by servers and load generator)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_summary(result: dict[str, Any]) -> None:
    print(f"\n== {result['config']['model']}")
    print("in-process reference:")
    for r in result["inprocess"]:
        print(f"  {r['what']:<10} batch {r['batch']:>3} {r['records_per_s']:>9.0f} rec/s  p50 {r['p50_ms']:.2f} ms")
    print("cells (one record per request):")
    for c in result["cells"]:
        mb = f"{c['mean_batch']:.1f}" if c["mean_batch"] else "-"
        p50 = f"{c['p50_ms']:.2f}" if c["p50_ms"] is not None else "-"
        cpu = f"{c['server_cpu_ms_per_request']:.2f}" if c.get("server_cpu_ms_per_request") else "-"
        print(f"  {c['target']:<26} {c['clients']:>3} clients {c['records_per_s']:>7.0f} rec/s  p50 {p50:>7} ms  "
              f"batch {mb:>5}  server CPU {cpu} ms/req  errors {c['errors']}")
    r = result["ratios"]
    for key in ("batching_speedup", "ray_over_triton", "throughput_mode_on_over_off"):
        print(f"{key}:")
        for sub, by in r[key].items():
            print(f"  {sub:<22} " + "  ".join(f"{k}: {v:.2f}" for k, v in by.items()))
    print("ray over in-process:", json.dumps({k: round(v, 3) for k, v in r["ray_over_inprocess"].items()}))
    for a in r["aims"]:
        v = "-" if a["value"] is None else f"{a['value']:.2f}"
        print(f"aim {a['name']}: {v} (target {a['target']}) {'met' if a['met'] else 'MISSED'}")


# -- main --------------------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 and 8 clients, 1 s warm-up, 2 s windows, 64 records")
    ap.add_argument("--models", default="small,production",
                    help="small (the demo's retail model) and/or production (bench/models.py: MiniLM text + "
                    "ResNet-18-sized image tower, trained briefly, cached); default both")
    ap.add_argument("--throughput-modes", default="on,off",
                    help="Ray Serve throughput mode(s) to measure, the first also against Triton (default on,off)")
    ap.add_argument("--package", help="an exported model package to serve instead of --models "
                    "(needs the onnx-fp32 variant)")
    ap.add_argument("--clients", default="1,8,32,64", help="concurrent clients per cell (default 1,8,32,64)")
    ap.add_argument("--v1-clients", default="1,64",
                    help="client counts for Ray Serve's /v1 records endpoint (default 1,64; '' skips)")
    ap.add_argument("--echo-clients", default="64",
                    help="client counts for the no-model Ray Serve baseline (bench/serve_echo.py; default 1,8,64; "
                    "'' skips)")
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per cell (default 3)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per cell (default 1)")
    ap.add_argument("--records", type=int, default=256, help="distinct sample records cycled (default 256)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="dynamic batching: rows per engine call "
                    "(default 64, both servers)")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0,
                    help="dynamic batching: how long a batch waits to fill (default 2 ms, both servers)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX Runtime intra-op threads of each model instance and of the in-process "
                    "reference (default 1)")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    ap.add_argument("--servers", default="ray,triton", help="which servers to run (default ray,triton)")
    ap.add_argument("--out", type=Path, default=OUT, help="where serving.json / serving.png go")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.v1_clients, args.echo_clients = "1,8", "8", "8"
        args.duration, args.warmup, args.records, args.models = 1.0, 0.5, 64, "small"
    return args


def prepare_data(pkg_dir: Path, records: int, threads: int, data_dir: Path, workload: str
                 ) -> tuple[Any, list[dict], list[Any]]:
    """Sample records, their per-record tensors and the in-process session's
    logits for them, written for the load generator."""
    from pipeline.config import EngineConfig
    from pipeline.engines import create_engine
    from pipeline.package import load_package
    from pipeline.predictor import Predictor
    from pipeline.preprocess import Prepared
    from pipeline.records import json_safe
    from pipeline.tooling import sample_data

    pkg = load_package(pkg_dir)
    engine = create_engine(pkg, EngineConfig(kind="onnxruntime", device="cpu", variant="fp32", threads=threads))
    predictor = Predictor(pkg, engine, batch_size=64, path="bench")
    raws = [s.record for s in sample_data.generate(workload, records, seed=5)]
    prepared = [predictor.prepare(r) for r in raws]
    bad = [i for i, p in enumerate(prepared) if not isinstance(p, Prepared)]
    if bad:
        raise RuntimeError(f"{len(bad)} sample records failed to decode; the benchmark needs valid ones")
    arrays: dict[str, np.ndarray] = {}
    inputs = [t.name for t in pkg.manifest.signature.inputs]
    outputs = [t.name for t in pkg.manifest.signature.outputs]
    for i, p in enumerate(prepared):
        feeds = predictor.pre.collate([p])
        for n in inputs:
            arrays[f"{i}/in/{n}"] = feeds[n]
        for n, v in engine.run(feeds).items():
            arrays[f"{i}/out/{n}"] = v
    np.savez(data_dir / "tensors.npz", **arrays)
    (data_dir / "meta.json").write_text(json.dumps({"records": len(raws), "inputs": inputs, "outputs": outputs}))
    (data_dir / "v1.json").write_text(json.dumps([json.dumps(json_safe(r)) for r in raws]))
    return predictor, raws, prepared


def _targets_ray(srv: RayServe, mode: str, pkg: Any) -> list[Target]:
    out = []
    srv_key = f"ray-tm-{mode}"
    for prefix, app, batching in ((RAY_BATCHED, "batched", True), (RAY_UNBATCHED, "unbatched", False)):
        base = f"127.0.0.1:{srv.port}{prefix}"
        metrics = f"http://{base}/metrics"
        out.append(Target(f"{srv_key}/http/{app}", srv_key, "v2", batching, base, pkg.name, metrics, srv.proc.pid))
        out.append(Target(f"{srv_key}/grpc/{app}", srv_key, "v2", batching, f"127.0.0.1:{srv.grpc_port}",
                          pkg.name, metrics, srv.proc.pid, protocol="grpc", app=app))
        out.append(Target(f"{srv_key}/v1/{app}", srv_key, "v1", batching, base, pkg.spec.name, metrics,
                          srv.proc.pid))
    out.append(Target(f"{srv_key}/echo", srv_key, "echo", False, f"127.0.0.1:{srv.port}{RAY_ECHO}", "", "",
                      srv.proc.pid))
    return out


def run_model(args: argparse.Namespace, which: str, work: Path) -> dict[str, Any]:
    """Every cell for one model: Triton throughout, Ray Serve once per throughput mode."""
    from pipeline.package import load_package

    clients, v1_clients, echo_clients = _ints(args.clients), _ints(args.v1_clients), _ints(args.echo_clients)
    modes = [m for m in args.throughput_modes.split(",") if m]
    wait_s = args.batch_wait_ms / 1e3
    t_start, load_at_start = time.monotonic(), os.getloadavg()
    if args.package:
        src = Path(args.package)
    else:
        from bench.models import production_package, small_package

        print(f"model: {which} (built once, then cached)", flush=True)
        src = small_package() if which == "small" else production_package()
    pkg_dir = work / "package"
    shutil.copytree(src, pkg_dir)  # the cache may be rebuilt under us by another run
    pkg = load_package(pkg_dir)
    data_dir = work / "data"
    data_dir.mkdir()
    predictor, raws, prepared = prepare_data(pkg_dir, args.records, args.threads, data_dir, pkg.spec.name)
    print("in-process reference ...", flush=True)
    ref = inprocess(predictor, raws, prepared, [1, 8, 32, args.max_batch_size], max(1.0, args.duration / 2))
    predictor.close()

    triton_srv: Any = None
    gen_proc = None
    cells: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    try:
        triton_targets: list[Target] = []
        if "triton" in args.servers:
            from deploy.triton import server as ts

            repo = work / "triton-repo"
            models = build_triton(pkg_dir, repo, args.max_batch_size, wait_s, args.threads)
            (work / "triton").mkdir()
            triton_srv = ts.start_server(repo, list(models), work / "triton", timeout_s=300)
            for m, batching in zip(models, (True, False), strict=True):
                mode = "batched" if batching else "unbatched"
                triton_targets.append(Target(f"triton/http/{mode}", "triton", "v2", batching, triton_srv.http_url,
                                             m, triton_srv.metrics_url, triton_srv.proc.pid))
                triton_targets.append(Target(f"triton/grpc/{mode}", "triton", "v2", batching, triton_srv.grpc_url,
                                             m, triton_srv.metrics_url, triton_srv.proc.pid, protocol="grpc"))
        gen_proc = ctx.Process(target=loadgen_main, args=(child, str(data_dir)), name="mmpipe-loadgen")
        gen_proc.start()

        def call(op: str, target: Target, **kw: Any) -> dict[str, Any]:
            parent.send((op, {"target": target.__dict__, **kw}))
            status, payload = parent.recv()
            if status != "ok":
                raise RuntimeError(f"load generator: {payload}")
            return payload

        for mode in modes if "ray" in args.servers else [None]:
            ray_srv = None
            try:
                targets = list(triton_targets) if mode == modes[0] or mode is None else []
                if mode is not None:
                    ray_srv = start_ray(pkg_dir, work, args.num_cpus, args.max_batch_size, wait_s, args.threads,
                                        mode)
                    wait_ray(ray_srv)
                    targets += _targets_ray(ray_srv, mode, pkg)
                trees = {t.server: t.tree_pid for t in [*triton_targets, *targets]}
                for t in targets:
                    c = call("check", t)
                    checks.append(c)
                    if not c["ok"]:
                        raise RuntimeError(f"{t.key} does not compute the in-process model's outputs: {c}")
                v2 = [t for t in targets if t.api == "v2"]
                for n in sorted(set(clients + v1_clients + echo_clients)):
                    order = v2 if n % 2 == 0 else list(reversed(v2))
                    chosen = ([t for t in order if n in clients]
                              + [t for t in targets if t.api == "v1" and n in v1_clients]
                              + [t for t in targets if t.api == "echo" and n in echo_clients])
                    for t in chosen:
                        c = call("cell", t, clients=n, warmup_s=args.warmup, duration_s=args.duration, trees=trees)
                        cells.append(c)
                        p50 = f"{c['p50_ms']:.1f}" if c["p50_ms"] is not None else "-"
                        print(f"  {t.key:<26} {n:>3} clients: {c['records_per_s']:7.0f} rec/s  p50 {p50} ms  "
                              f"errors {c['errors']}", flush=True)
            finally:
                if ray_srv is not None:
                    ray_srv.stop()
    finally:
        if gen_proc is not None:
            with contextlib.suppress(Exception):
                parent.send(None)
            gen_proc.join(10)
            if gen_proc.is_alive():
                gen_proc.terminate()
        if triton_srv is not None:
            triton_srv.stop()
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
                    "others": "each cell's cores.others is the CPU the rest of the machine used meanwhile"},
        "config": {
            "model": f"{which}: {pkg.name} (version {pkg.version}, onnx-fp32, {pkg.spec.name} workload)",
            "clients": clients, "v1_clients": v1_clients, "echo_clients": echo_clients,
            "throughput_modes": modes, "duration_s": args.duration, "warmup_s": args.warmup,
            "records": len(raws), "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
            "ort_threads": args.threads, "ray_num_cpus": args.num_cpus,
            "budget": (f"each server: one model instance, {args.threads} ONNX Runtime intra-op thread(s); "
                       f"Ray local cluster num_cpus={args.num_cpus}; server HTTP/routing threads and the "
                       "load generator unpinned on the same cores"),
        },
        "checks": checks, "inprocess": ref, "cells": cells, "elapsed_s": time.monotonic() - t_start,
    }
    result["ratios"] = ratios(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.servers = [s for s in args.servers.split(",") if s]
    if set(args.servers) - {"ray", "triton"} or not args.servers:
        print("error: --servers takes ray and/or triton", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs, aims = [], []
    for which in [m for m in args.models.split(",") if m]:
        work = Path(tempfile.mkdtemp(prefix="mmpipe-bench-serving-"))
        try:
            result = run_model(args, which, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        runs.append(result)
        aims += [{**a, "name": f"{which}: {a['name']}"} for a in result["ratios"]["aims"]]
        print_summary(result)
    stem = "serving-quick" if args.quick else "serving"
    doc = {"aims": aims, "runs": runs}
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    chart(runs[0], args.out / f"{stem}.png")
    print(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
