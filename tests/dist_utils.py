"""Run a function on N CPU processes joined in one gloo process group, and get each rank's return value back.

    results = run_distributed(fn, world_size=2, *args)   # results[rank] = fn(rank, world_size, *args)

`fn` must be importable by name (a module-level function of a test module or of this file): the workers are
started with torch.multiprocessing.spawn. The rendezvous is a file store in a fresh temporary directory, so tests
running at the same time (pytest-xdist, other people on the machine) never compete for a port. Each worker uses
one intra-op thread. Return values go back through torch.save, so they may hold tensors, dicts, lists, numbers.
A failure on any rank fails the call with that rank's traceback.

A worker ends without the interpreter's finalisation, as the programs do (clusterlab.programs.end_without_finalising):
there gloo's worker threads aborted a worker now and then on a loaded 2-core CI machine, "terminate called without
an active exception", after every rank had returned.

`single_thread` (import it into a test module) runs that module's tests with one intra-op thread: on a small,
shared machine OpenMP threads spin against each other and make tiny convolutions a hundred times slower.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _worker(rank: int, world_size: int, store_dir: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(store_dir, f"result{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int = 2, *args):
    """[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)], each on its own gloo rank."""
    with tempfile.TemporaryDirectory(prefix="clusterlab_dist_") as store_dir:
        mp.spawn(_worker, args=(world_size, store_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(store_dir, f"result{r}.pt"), weights_only=True) for r in range(world_size)]


def free_port() -> int:
    """A TCP port free on this host now, for a rendezvous the test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
