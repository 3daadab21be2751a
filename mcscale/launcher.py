"""What a multi-process launcher (``accelerate launch``, ``torchrun``) tells this process through its
environment, read without importing torch so the command line can check a run before heavy imports."""

from __future__ import annotations

import os

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def check_global_batch(batch_size: int, world_size: int, key: str, sync_batchnorm: bool = True) -> int:
    """Rows per rank of the global batch ``batch_size``; refuse one the ranks cannot share evenly, or
    one that leaves BatchNorm a single row (per rank when its statistics are not synchronised)."""
    from mcscale.config import ConfigError

    if batch_size % world_size:
        raise ConfigError(f"{key}: the global batch {batch_size} does not split over {world_size} ranks; "
                          f"use a multiple of {world_size}")
    rows = batch_size // world_size
    if not sync_batchnorm and rows < 2:
        raise ConfigError(f"{key}: {rows} row per rank leaves BatchNorm one sample with "
                          f"distributed.sync_batchnorm=false; use at least {2 * world_size}")
    return rows
