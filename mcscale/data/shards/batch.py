"""What every sharded loader yields, how the data is split over ranks, and the trainer adapter.

Split (the same for the WebDataset and the DALI loader, which is DALI's own rule): the shards'
samples, concatenated in manifest order, are cut into ``world_size`` contiguous ranges; range r is
``[N*r // W, N*(r+1) // W)``, so range sizes differ by at most one. A rank reads only the shards its
range touches.

- Training epochs: rank r reads range ``(r + epoch) % W`` (DALI's reader moves to the next range each
  epoch too), shuffled, and every rank takes exactly ``steps_per_epoch = N // (W * B)`` full batches:
  no padding; the at most ``B`` unused samples of a range differ from epoch to epoch.
- Clean passes (K-means init, evaluation): rank r reads range r in order. Every rank yields
  ``ceil(ceil(N / W) / B)`` batches of identical sizes (B, the last one ``ceil(N/W) - (n-1)*B``): a
  rank whose range is one sample shorter repeats its last sample once, flagged in ``padded``. So every
  sample appears exactly once among the unpadded entries of all ranks, and gathers see equal shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mcscale.data.augment import Normalizer
from mcscale.data.sources import DataError
from mcscale.data.views import ViewBatch


@dataclass
class ShardBatch:
    """ViewBatch's structure plus labels, the optional clean view and the padding flags."""

    x1: torch.Tensor | None  # strong view, normalised float (N, C, S, S); None in a clean pass
    x2: torch.Tensor | None  # an independent strong view
    index: torch.Tensor  # int64 (N,): dataset index into the long-tailed subset
    labels: torch.Tensor  # int64 (N,)
    clean: torch.Tensor | None = None  # clean view (resize shorter side + centre crop), normalised
    padded: torch.Tensor | None = None  # bool (N,): True for a padding repeat (clean passes only)

    def view_batch(self) -> ViewBatch:
        return ViewBatch(self.x1, self.x2, self.index)


def rank_range(n: int, part: int, parts: int) -> tuple[int, int]:
    return n * part // parts, n * (part + 1) // parts


def train_range(n: int, rank: int, world_size: int, epoch: int) -> tuple[int, int]:
    return rank_range(n, (rank + epoch) % world_size, world_size)


def steps_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    steps = n // (world_size * batch_size)
    if steps < 1:
        raise DataError(f"batch_size {batch_size} x {world_size} rank(s) is more than the {n} samples; "
                        "lower the batch size")
    return steps


def clean_layout(n: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(samples per rank after padding, batches per rank) of a clean pass."""
    per_rank = math.ceil(n / world_size)
    return per_rank, math.ceil(per_rank / batch_size)


def check_split(rank: int, world_size: int, batch_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(f"rank {rank!r} / world_size {world_size!r}: need 0 <= rank < world_size")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DataError(f"batch_size: must be a positive integer, got {batch_size!r}")


def sample_seed(seed: int, epoch: int, index: int, view: int) -> int:
    """A 63-bit seed for one view of one sample in one epoch (splitmix64 of the tuple): augmentations
    then do not depend on the number of workers, or on which worker met the sample."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + view) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) >> 1


def decode_ascii(codes: torch.Tensor) -> torch.Tensor:
    """(N, L) uint8 ASCII digits padded with zeros (DALI's fn.pad) -> int64 (N,)."""
    codes = codes.to("cpu", torch.int64)
    digits = codes - 48
    valid = (digits >= 0) & (digits <= 9)
    value = torch.zeros(codes.shape[0], dtype=torch.int64)
    for col in range(codes.shape[1]):
        value = torch.where(valid[:, col], value * 10 + digits[:, col], value)
    return value


def pad_last(batch: ShardBatch, size: int) -> ShardBatch:
    """Grow a clean batch to ``size`` rows by repeating its last row, flagged as padding."""
    extra = size - batch.index.shape[0]
    if extra <= 0:
        return batch

    def grow(t):
        return None if t is None else torch.cat([t, t[-1:].expand(extra, *t.shape[1:])])

    padded = torch.zeros(size, dtype=torch.bool)
    padded[-extra:] = True
    if batch.padded is not None:
        padded[:-extra] = batch.padded.cpu()
    return ShardBatch(grow(batch.x1), grow(batch.x2), grow(batch.index), grow(batch.labels), grow(batch.clean),
                      padded.to(batch.index.device))


class StreamViews:
    """Adapter giving a sharded loader the interface the trainer uses on InMemoryViews.

    ``two_views(seed, step, batch_size)`` follows the loader's epochs: step s is batch
    ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``. A jump (a resumed run) restarts that
    epoch and skips the batches before ``step``: the WebDataset loader then gives exactly the batches
    of the uninterrupted run (its order and augmentations are functions of (seed, epoch, rank));
    DALI's augmentation randomness is not replayable. ``clean_batches`` yields (index, clean) without
    the padding, in shard order: consumers must place results by index, not by position.
    """

    is_image = True

    def __init__(self, loader, device: torch.device | str = "cpu"):
        self.loader = loader
        self.device = torch.device(device)
        self._epoch = self._position = None
        self._iter = None

    def __len__(self) -> int:
        return self.loader.num_samples

    @property
    def in_channels(self) -> int:
        return self.loader.channels

    @property
    def image_size(self) -> int:
        return self.loader.image_size

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer(self.loader.mean, self.loader.std)

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.loader.manifest.labels()), dtype=torch.long)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps per epoch for the GLOBAL batch ``batch_size`` (every rank's loader holds its share)."""
        built_for = self.loader.batch_size * self.loader.world_size
        if batch_size != built_for:
            raise DataError(f"batch_size {batch_size}: the sharded loader was built for {built_for} "
                            f"({self.loader.world_size} rank(s) x {self.loader.batch_size})")
        return self.loader.steps_per_epoch

    def two_views(self, seed: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> ViewBatch:
        """This rank's share of global step ``step`` (the loader was built for this rank)."""
        self._check_rank(rank, world_size)
        epoch, position = divmod(step, self.steps_per_epoch(batch_size))
        if (epoch, position) != (self._epoch, self._position):
            self._iter = iter(self.loader.epoch(epoch))
            for _ in range(position):
                next(self._iter)
        batch = next(self._iter)
        self._epoch, self._position = epoch, position + 1
        if position + 1 == self.loader.steps_per_epoch:
            next(self._iter, None)  # let the loader finish its epoch (DALI drains its reader there)
            self._epoch = self._position = self._iter = None
        nb = self.device.type == "cuda"
        return ViewBatch(batch.x1.to(self.device, non_blocking=nb), batch.x2.to(self.device, non_blocking=nb),
                         batch.index.cpu())

    def _check_rank(self, rank: int, world_size: int) -> None:
        if (rank, world_size) != (self.loader.rank, self.loader.world_size):
            raise DataError(f"rank {rank} of {world_size}: the sharded loader was built for rank "
                            f"{self.loader.rank} of {self.loader.world_size}")

    def clean_batches(self, batch_size: int | None = None, rank: int = 0, world_size: int = 1):
        """This rank's range, clean view, padding repeats dropped (so ranks may differ by one row)."""
        self._check_rank(rank, world_size)
        for batch in self.loader.clean_batches(batch_size):
            keep = ~batch.padded
            yield batch.index[keep].cpu(), batch.clean[keep].to(self.device)
