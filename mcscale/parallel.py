"""Data parallelism for the trainers: the process group, and what a step does across ranks.

A run started by ``accelerate launch`` or ``torchrun`` finds RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT in its environment; ``setup`` then joins the process group (nccl on GPUs,
gloo with ``--cpu`` or without a GPU) and picks the rank's device. Without those variables, or with
WORLD_SIZE=1, nothing is initialised and every helper here is a no-op.

Why not ``torch.nn.parallel.DistributedDataParallel``: a step runs the model on each view
separately (BatchNorm statistics are per view, as in the papers' code) and the losses of
``mcscale.distributed`` already carry the global gradient times W; averaging the gradients in one
flat all-reduce after backward is then exact, independent of DDP's bucketing and of how many
forward passes a step makes. The cost is that communication does not overlap the backward pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mcscale.errors import RunError
from mcscale.launcher import (  # noqa: F401
    ENV_KEYS,
    check_global_batch,
    launched_rank,
    launched_world_size,
)


@dataclass
class Parallel:
    """This process's place in the job: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_state(self, module: torch.nn.Module) -> None:
        """Every parameter and buffer from rank 0, so all ranks start from the same model."""
        if not self.active:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            COMM.record(tensor)
            dist.broadcast(tensor.data, src=0)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` (same shape and dtype on every rank), in place."""
        if self.active:
            COMM.record(tensor)
            dist.broadcast(tensor, src=0)
        return tensor

    def average_gradients(self, parameters) -> None:
        """Mean of every parameter's gradient over the ranks, in one flat all-reduce.

        A parameter without a gradient on this rank contributes zeros (and then holds the mean), so
        the ranks always agree on the message layout.
        """
        if not self.active:
            return
        params = [p for p in parameters if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        COMM.record(flat)
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g)
            offset += g.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. one rank received SIGTERM)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        COMM.record(t)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def share_text(self, text: str) -> str:
        """Rank 0's string on every rank (plain UTF-8 bytes: no pickles between processes)."""
        if not self.active:
            return text
        data = torch.tensor(list(text.encode()) if self.is_main else [], dtype=torch.uint8)
        size = self.broadcast(torch.tensor([data.numel()], dtype=torch.int64, device=self.device))
        buffer = torch.zeros(int(size), dtype=torch.uint8, device=self.device)
        if self.is_main:
            buffer.copy_(data)
        return bytes(self.broadcast(buffer).cpu().tolist()).decode()

    def on_main(self, fn):
        """Run ``fn`` (file-system work: folders, checkpoint choice) on rank 0 only; every rank gets
        its JSON-able result, or raises rank 0's error, so no rank waits for one that failed."""
        from mcscale.config import ConfigError
        from mcscale.data.sources import DataError

        if not self.active:
            return fn()
        outcome, failure = {}, None
        if self.is_main:
            try:
                outcome = {"result": fn()}
            except Exception as err:  # shared first, then raised: the other ranks must not wait
                failure = err
                outcome = {"error": str(err), "kind": type(err).__name__}
        outcome = json.loads(self.share_text(json.dumps(outcome)))
        if failure is not None:
            raise failure
        if "error" in outcome:
            kinds = {"ConfigError": ConfigError, "DataError": DataError}
            raise kinds.get(outcome["kind"], RunError)(outcome["error"])
        return outcome["result"]


def leave_process_group() -> None:
    """Close the process group a multi-process run joined (torch warns at exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup(device_name: str, force_cpu: bool = False) -> Parallel:
    """Join the process group the launcher described (if any) and pick this rank's device."""
    force_cpu = force_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    world = launched_world_size()
    if world <= 1:
        return Parallel(0, 1, pick_device(device_name, force_cpu))
    missing = [key for key in ENV_KEYS if key not in os.environ]
    if missing:
        raise RunError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start with `accelerate launch` or `torchrun`")
    device = pick_device(device_name, force_cpu)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return Parallel(dist.get_rank(), dist.get_world_size(), device)


# ---------------------------------------------------------------- collectives (identity on one process)
@dataclass
class CommCounter:
    """Bytes (and number) of the collectives issued since the last ``take``/``reset``."""

    bytes: int = 0
    calls: int = 0

    def record(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def take(self) -> int:
        """The bytes since the last take, then zero: call once per step for a per-step figure."""
        nbytes = self.bytes
        self.reset()
        return nbytes

    def reset(self) -> None:
        self.bytes = 0
        self.calls = 0


COMM = CommCounter()


def _counter(counter: CommCounter | None) -> CommCounter:
    return COMM if counter is None else counter


# ---------------------------------------------------------------- process group and collectives
def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _initialised() else 1


def rank() -> int:
    return dist.get_rank() if _initialised() else 0


def all_reduce_sum(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """A new, detached tensor holding the sum of ``t`` over all ranks (a copy at world size 1)."""
    out = t.detach().clone()
    if world_size() == 1:
        return out
    _counter(counter).record(out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def _gather_sizes(rows: int, device: torch.device, counter: CommCounter | None) -> list[int]:
    """Every rank's row count, in rank order (identical on every rank)."""
    if world_size() == 1:
        return [rows]
    local = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(local) for _ in range(world_size())]
    _counter(counter).record(local)
    dist.all_gather(sizes, local)
    return [int(s) for s in sizes]


def _gather_rows(t: torch.Tensor, sizes: list[int], counter: CommCounter | None) -> torch.Tensor:
    """Concatenation of every rank's rows (detached); all_gather needs equal shapes, so pad to the max."""
    local = t.detach()
    if world_size() == 1:
        return local
    longest = max(sizes)
    if longest == 0:  # every rank agrees on this (same sizes): skip the empty collective
        return local
    pad = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
    send = torch.cat([local, pad]).contiguous()
    parts = [torch.empty_like(send) for _ in sizes]
    _counter(counter).record(send)
    dist.all_gather(parts, send)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _offset(sizes: list[int]) -> int:
    """Index of this rank's first row in the gathered (rank-ordered) matrix."""
    return sum(sizes[: rank()])


def all_gather_cat(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """Rows of every rank concatenated in rank order (detached); ranks may hold different row counts.

    Two collectives: the row counts (8 bytes per rank), then the rows padded to the longest rank.
    """
    return _gather_rows(t, _gather_sizes(t.shape[0], t.device, counter), counter)


def _splice(full: torch.Tensor, local: torch.Tensor, start: int) -> torch.Tensor:
    """``full`` with rows [start, start + len(local)) replaced by ``local`` (which keeps its graph)."""
    return torch.cat([full[:start], local, full[start + local.shape[0]:]])


def all_gather_with_grad(t: torch.Tensor, counter: CommCounter | None = None) -> torch.Tensor:
    """``all_gather_cat`` whose local rows stay connected to ``t``'s graph (no backward collective).

    Meant for a loss that every rank evaluates identically on the gathered matrix: its gradient with
    respect to the local rows is then exactly the global loss's gradient for those rows (scale it by
    W for DDP, as the losses here do). The other ranks' rows are constants here.
    """
    sizes = _gather_sizes(t.shape[0], t.device, counter)
    return _splice(_gather_rows(t, sizes, counter), t, _offset(sizes))


def shard_rows(batch: int, rank: int, world: int) -> slice:
    """Rows [rank * B/W, (rank + 1) * B/W) of a global batch of ``batch`` rows: rank ``rank``'s share."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_batch: need 0 <= rank < world, got rank {rank} and world {world}")
    if batch % world:
        raise ValueError(
            f"shard_batch: global batch size {batch} is not divisible by the world size {world}; "
            f"use a batch size that is a multiple of {world}"
        )
    per_rank = batch // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def shard_batch(index_tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The contiguous slice of a global batch (e.g. sample indices of one global permutation) that
    rank ``rank`` of ``world`` holds (``shard_rows``)."""
    return index_tensor[shard_rows(index_tensor.shape[0], rank, world)]


def pick_device(name: str, force_cpu: bool = False) -> torch.device:
    if force_cpu or name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for but no CUDA device is visible; use --cpu or device=auto")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
