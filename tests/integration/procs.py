"""Finding processes a test started (the only ones it may signal): by a
marker on their command line, or as descendants of a process it spawned."""

from __future__ import annotations

from pathlib import Path


def pids_with(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (e.g. our own
    Ray temp dir): the only processes a test may kill."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def descendants(root: int, title: str = "") -> list[int]:
    """Pids of live descendants of process ``root`` (e.g. the serve command:
    the Ray daemons and workers it started) whose command line contains
    ``title`` (Ray sets its workers' titles, e.g.
    ``ray::ServeReplica:APP:DEPLOYMENT``).  Only our own processes."""
    children: dict[int, list[int]] = {}
    cmdlines: dict[int, bytes] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdlines[int(d.name)] = (d / "cmdline").read_bytes()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[-1].split()  # state ppid ...
        if len(rest) >= 2 and rest[0] != "Z":
            children.setdefault(int(rest[1]), []).append(int(d.name))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if title.encode() in cmdlines.get(pid, b""):
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out
