"""Helpers shared by test modules: 2-rank gloo groups in spawned processes, and re-running a test file
in a fresh interpreter (for the Triton interpreter mode, which is fixed at triton's first import)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _gloo_worker(rank: int, world: int, store_path: str, out_dir: str, run) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = run(rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def run_on_gloo_ranks(run, tmp_dir, world: int = 2, seconds: float = 150) -> list:
    """``run(rank)`` (a module-level function) on ``world`` spawned ranks of one gloo group; the
    ranks' return values, in rank order. ``run`` should catch its own errors and return them, since a
    rank that dies leaves the others waiting in a collective until the deadline."""
    args = (world, str(tmp_dir / "store"), str(tmp_dir), run)
    context = mp.start_processes(_gloo_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-rank gloo workers did not finish within {seconds} s")
    return [torch.load(tmp_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def run_file_in_fresh_interpreter_mode(path: str) -> None:
    """Run the test file ``path`` in a new process with TRITON_INTERPRET=1 and fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
