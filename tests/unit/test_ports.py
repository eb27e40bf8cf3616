"""Ports for local services come from outside the kernel's ephemeral range,
so a port picked for HAProxy or a broker is not handed to some process's
outgoing connection before the service binds it."""

from __future__ import annotations

import os
import socket

import pytest

from deploy.serve import cli
from pipeline import ports


def _outside_ephemeral(port: int) -> bool:
    lo, hi = ports.ephemeral_range()
    return not lo <= port <= hi


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_and_ray_worker_ranges() -> None:
    picked = ports.free_ports(20)
    assert len(set(picked)) == 20
    for port in picked:
        assert _outside_ephemeral(port)
        assert not ports.RAY_WORKER_PORTS[0] <= port <= ports.RAY_WORKER_PORTS[1]
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))


def test_a_port_in_use_is_never_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        port = ports.free_port()
        held.bind(("0.0.0.0", port))
        # Every pick lands on the held port first, then anywhere.
        real = ports.random.randint
        calls = iter([port] * 5)
        monkeypatch.setattr(ports.random, "randint", lambda a, b: next(calls, None) or real(a, b))
        assert ports.free_port() != port


def test_avoided_ranges_are_honoured() -> None:
    bands = ports._bands()
    a, b = bands[0]
    avoid = [(a, b - 100)]  # all but the top 100 ports of the largest band
    for port in ports.free_ports(30, avoid=avoid):
        assert not a <= port <= b - 100
    start = ports.port_block(65, avoid=[(a, a + 1000)])
    assert start > a + 1000 or start + 64 < a
    assert all(_outside_ephemeral(p) for p in range(start, start + 65))


def test_a_local_serve_gets_disjoint_ports_outside_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    ranges = (f"RAY_SERVE_DIRECT_INGRESS_{m}_{p}_PORT" for m in ("MIN", "MAX") for p in ("HTTP", "GRPC"))
    keys = [*cli.LOCAL_PORTS, *ranges]
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    cli._local_ports([], block=64)

    spans = [(int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_MIN_{p}_PORT"]),
              int(os.environ[f"RAY_SERVE_DIRECT_INGRESS_MAX_{p}_PORT"])) for p in ("HTTP", "GRPC")]
    spans += [(int(os.environ[k]), int(os.environ[k])) for k in cli.LOCAL_PORTS]
    for i, (a, b) in enumerate(spans):
        assert _outside_ephemeral(a) and _outside_ephemeral(b)
        for c, d in spans[i + 1:]:
            assert b < c or d < a, f"{(a, b)} overlaps {(c, d)}"


def test_ports_named_by_the_environment_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", "9101")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "30064")
    for key in cli.LOCAL_PORTS[1:]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", raising=False)
    cli._local_ports([], block=64)

    assert os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9101"
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "30000"
    grpc = int(os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"])
    assert grpc + 64 < 30000 or grpc > 30064


def test_a_local_serve_never_takes_the_configs_own_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in cli.LOCAL_PORTS:
        monkeypatch.delenv(key, raising=False)
    for proto in ("HTTP", "GRPC"):
        monkeypatch.setenv(f"RAY_SERVE_DIRECT_INGRESS_MIN_{proto}_PORT", "30000" if proto == "HTTP" else "30100")
        monkeypatch.setenv(f"RAY_SERVE_DIRECT_INGRESS_MAX_{proto}_PORT", "30064" if proto == "HTTP" else "30164")
    http_port = ports.free_port()
    real = ports.random.randint
    calls = iter([http_port] * 20)  # every side port's first picks land on the config's HTTP port
    monkeypatch.setattr(ports.random, "randint", lambda a, b: next(calls, None) or real(a, b))
    cli._local_ports([http_port], block=64)
    assert http_port not in {int(os.environ[k]) for k in cli.LOCAL_PORTS}
