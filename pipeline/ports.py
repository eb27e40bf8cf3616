"""Free TCP ports for the services mmpipe starts locally (Ray Serve's side
ports, a local Triton, and the servers the tests start).

Why not ``bind(("", 0))``: the kernel hands out such a port from its
ephemeral range (``net.ipv4.ip_local_port_range``), closing the probe socket
frees it, and every other process on the machine that connects out or binds
port 0 (Ray's workers, gRPC clients, a Kafka broker) draws from that same
range.  A port picked that way can be taken again before the service it was
picked for binds it, and the service then dies with "Address already in use".
So ports here come from outside the ephemeral range and outside Ray's worker
port range (10002-19999), picked at random and checked by binding them on
every interface (as the services will).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = (10002, 19999)
"""Ray's default ``min_worker_port`` / ``max_worker_port``."""

_LOWEST = 20000
_HIGHEST = 65535
_EPHEMERAL_FALLBACK = (32768, 60999)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux), else the usual default."""
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return _EPHEMERAL_FALLBACK


def _bands() -> list[tuple[int, int]]:
    """Inclusive port ranges above Ray's worker ports and outside the
    ephemeral range, largest first."""
    lo, hi = ephemeral_range()
    bands = [(_LOWEST, min(lo - 1, _HIGHEST)), (max(hi + 1, _LOWEST), _HIGHEST)]
    bands = [(a, b) for a, b in bands if b - a >= 64]  # none: the ephemeral range covers everything
    return sorted(bands, key=lambda ab: ab[1] - ab[0], reverse=True)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _inside(port: int, avoid: list[tuple[int, int]]) -> bool:
    return any(a <= port <= b for a, b in avoid)


def free_ports(n: int, *, avoid: list[tuple[int, int]] | None = None) -> list[int]:
    """``n`` distinct ports free right now, outside the ephemeral range and
    the inclusive ranges in ``avoid`` (blocks already handed to a service)."""
    avoid = avoid or []
    bands = _bands()
    if not bands:
        return _kernel_ports(n)
    weights = [b - a + 1 for a, b in bands]
    chosen: list[int] = []
    for _ in range(200 * n):
        a, b = random.choices(bands, weights)[0]
        port = random.randint(a, b)
        if port not in chosen and not _inside(port, avoid) and _bindable(port):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise OSError(f"no {n} free ports outside the ephemeral range {ephemeral_range()}")


def free_port(*, avoid: list[tuple[int, int]] | None = None) -> int:
    """One port free right now, outside the ephemeral range (and ``avoid``)."""
    return free_ports(1, avoid=avoid)[0]


def port_block(size: int, *, avoid: list[tuple[int, int]] | None = None) -> int:
    """The first port of ``size`` consecutive ports, all free right now and
    outside the ephemeral range (and the inclusive ranges in ``avoid``), for
    a service that hands out ports from a range of its own."""
    avoid = avoid or []
    for a, b in _bands():
        starts = list(range(a, b - size + 2, size))
        random.shuffle(starts)
        for start in starts:
            end = start + size - 1
            if any(not (end < lo or start > hi) for lo, hi in avoid):
                continue
            if all(_bindable(p) for p in range(start, end + 1)):
                return start
    raise OSError(f"no block of {size} free ports outside the ephemeral range {ephemeral_range()}")


def _kernel_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
