"""Running ``mmpipe batch`` on an existing Ray cluster as a Ray job.

With ``RAY_ADDRESS=http://HEAD:8265`` (the cluster's job API, what the Helm
chart's CronJob sets) ``mmpipe batch`` does not drive Ray Data from the pod
it was started in: it submits the same command as a Ray job, so the job's
driver runs on the cluster's head next to the GCS and the object store, and
the pod only waits and relays the job's output and outcome.

Why not Ray Client (``ray://HEAD:10001``): a Ray Data job's driver runs the
streaming executor, which keeps a stream of small calls to the cluster
going for the whole run; over Ray Client every one is a proxied gRPC call,
a dropped connection kills the job, and Ray's documentation steers Ray Data
and long-running jobs to Ray Jobs instead.  On this Ray version the client
server also crashed on start-up in our two-node test (a gRPC fork check),
so the chart no longer points at it.

The settings file travels with the job (its working directory); paths in
``--input``, ``--output`` and ``--package`` must be valid on the cluster
(object storage URIs, or a volume mounted on every node).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def is_job_api(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))  # type: ignore[union-attr]


def _entry_args(argv: list[str], config: str | None) -> list[str]:
    """The command's arguments with the settings file renamed to its copy in the job's working directory."""
    out, skip = [], False
    for arg in argv:
        if skip:
            out.append("settings.yaml")
            skip = False
        elif arg in ("-c", "--config"):
            out.append(arg)
            skip = True
        elif arg.startswith("--config="):
            out.append("--config=settings.yaml")
        else:
            out.append(arg)
    return out if config else list(argv)


def submit(address: str, argv: list[str], config: str | None, poll_s: float = 2.0) -> int:
    """Submit ``mmpipe batch ARGV`` to the cluster's job API, wait, print
    its output; returns 0 when the job succeeded, 1 otherwise."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="mmpipe-job-") as wd:
        if config:
            shutil.copyfile(config, Path(wd) / "settings.yaml")
        entry = shlex.join([sys.executable, "-m", "pipeline", "batch", *_entry_args(argv, config)])
        job_id = client.submit_job(entrypoint=entry, runtime_env={"working_dir": wd})
    print(f"submitted Ray job {job_id} to {address}", file=sys.stderr)
    status = ""
    while status not in TERMINAL:
        time.sleep(poll_s)
        status = str(client.get_job_status(job_id).value)
    sys.stdout.write(client.get_job_logs(job_id))
    sys.stdout.flush()
    if status != "SUCCEEDED":
        print(f"error: Ray job {job_id} ended {status}", file=sys.stderr)
        return 1
    return 0
