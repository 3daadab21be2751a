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

from mcscale.distributed import COMM
from mcscale.launcher import ENV_KEYS, check_global_batch, launched_rank, launched_world_size  # noqa: F401
from mcscale.runtime import RunError, pick_device



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
