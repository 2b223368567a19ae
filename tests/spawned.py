"""Two (or more) CPU processes for a test: a gloo group per worker and a runner with a deadline.

A worker is a module-level function ``worker(rank, *args, results)`` (the new processes import it by
name); it stores what it found in ``results[rank]``. Every process group is destroyed before its process
exits (a live gloo group at interpreter exit can abort under load), every wait has a deadline, and a
worker's failure comes back as its traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@contextlib.contextmanager
def gloo_group(store_path: str, rank: int, world: int, results: Any) -> Iterator[None]:
    """The worker's process group (one thread), destroyed on the way out; a failure's traceback goes to
    ``results[rank]``."""
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world)
        timeout = datetime.timedelta(seconds=120)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            yield
        finally:
            dist.destroy_process_group()
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
        raise


#: The workers are forked from a server process that has imported these once (multiprocessing's
#: ``forkserver``, started at the first call and kept for the test run): a fresh interpreter, single-threaded
#: when it forks, so each worker starts without importing torch again (``spawn`` imports it per worker).
PRELOAD = ["torch", "torch.distributed", "implicitdiff"]


def run_workers(worker: Callable[..., None], args: tuple, world: int, deadline_s: float = 300) -> dict:
    """Run ``worker(rank, *args, results)`` on ``world`` new processes; their ``results`` by rank."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with ctx.Manager() as manager:
        results = manager.dict()
        workers = mp.start_processes(
            worker, args=(*args, results), nprocs=world, start_method="forkserver", join=False
        )
        deadline = time.monotonic() + deadline_s
        try:
            while not workers.join(timeout=5):  # raises ProcessRaisedException with the traceback
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"workers still running after {deadline_s} s; reports so far: {dict(results)}"
                    )
        finally:
            for process in workers.processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
        results = dict(results)
    assert sorted(results) == list(range(world)), results
    for rank, report in results.items():
        assert not (isinstance(report, dict) and "error" in report), f"rank {rank}:\n{report['error']}"
    return results
