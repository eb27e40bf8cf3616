"""Ray Data's iterator threads are waited for before Ray shuts down, so a
failed job's error is reported instead of the process ending with exit 1
and no word (see ``pipeline.batch.job.quiesce_ray_data``)."""

from __future__ import annotations

import threading
import time

from pipeline.batch.job import quiesce_ray_data


def test_quiesce_waits_for_ray_data_threads_and_names_those_that_outlive_it() -> None:
    release = threading.Event()
    finishing = threading.Thread(target=time.sleep, args=(0.2,), name="iter_threaded", daemon=True)
    stuck = threading.Thread(target=release.wait, name="map_tp_filling_worker-7", daemon=True)
    other = threading.Thread(target=release.wait, name="Prefetcher", daemon=True)  # parked: not waited for
    for t in (finishing, stuck, other):
        t.start()
    try:
        left = quiesce_ray_data(timeout_s=1.0)  # returns while the stuck thread still runs
        assert not finishing.is_alive()
        assert left == ["map_tp_filling_worker-7"]
    finally:
        release.set()
    assert quiesce_ray_data(timeout_s=1.0) == []
