"""The in-memory ("tensor") loader: the long-tailed subset held as one tensor on the training device,
with batched augmentations there. Batches are a pure function of (seed, step), so a resumed run sees
exactly the samples and augmentations the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcscale.data.augment import (
    AugmentConfig,
    Normalizer,
    apply_strong,
    clean_view,
    draw_strong,
    feature_view,
    to_float,
)
from mcscale.parallel import shard_rows


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resuming needs no generator state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


@dataclass
class ViewBatch:
    x1: torch.Tensor  # prediction view (strong augmentation)
    x2: torch.Tensor  # pseudo-label view (an independent strong augmentation)
    index: torch.Tensor  # dataset indices of the samples (into the long-tailed subset)


class InMemoryViews:
    def __init__(self, source, augment: AugmentConfig, device: torch.device, image_size: int | None = None):
        self.device = device
        self.augment = augment
        self.labels = torch.as_tensor(np.asarray(source.labels), dtype=torch.long)
        self.is_image = source.kind == "image"
        if self.is_image:
            images = torch.from_numpy(np.ascontiguousarray(source.images)).permute(0, 3, 1, 2).contiguous()
            self.data = images.to(device)  # uint8 N x C x H x W
            self.image_size = image_size or int(images.shape[-1])
            self.normalizer = Normalizer.fit(self._clean_unnormalised(torch.arange(len(self))))
        else:
            self.data = torch.from_numpy(np.asarray(source.features, dtype=np.float32)).to(device)
            self.image_size = None
            self.feature_mean = self.data.mean(0)
            self.feature_std = self.data.std(0).clamp_min(1e-6)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.data.shape[1])

    @property
    def input_dim(self) -> int:
        return int(self.data.shape[1])

    # ------------------------------------------------------------ ordering
    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self) // batch_size)

    def batch_indices(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        """Samples of global step ``step``: epochs are fresh permutations, the last partial batch dropped."""
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(self), generator=step_generator(seed, epoch, stream=0, device=torch.device("cpu")))
        size = min(batch_size, len(self))
        return order[position * size : (position + 1) * size]

    # ------------------------------------------------------------ views
    def _clean_unnormalised(self, index: torch.Tensor) -> torch.Tensor:
        return clean_view(to_float(self.data[index.to(self.device)]), self.image_size)

    def clean(self, index: torch.Tensor) -> torch.Tensor:
        if not self.is_image:
            return (self.data[index.to(self.device)] - self.feature_mean) / self.feature_std
        return self.normalizer(self._clean_unnormalised(index))

    def strong(self, index: torch.Tensor, generator: torch.Generator, rows: slice = slice(None)) -> torch.Tensor:
        """The strong view of ``index[rows]``, with the random draws of the whole of ``index``: a rank
        holding rows of a global batch gets exactly those rows of the single-process view."""
        if not self.is_image:  # noise of the whole batch (cheap next to a network), then the rows
            noisy = feature_view(self.data[index.to(self.device)], self.augment, self.feature_std, generator)[rows]
            return (noisy - self.feature_mean) / self.feature_std
        _, channels, height, width = self.data.shape
        draws = draw_strong(index.shape[0], height, width, channels, self.augment, generator, self.device,
                            self.image_size)
        batch = to_float(self.data[index[rows].to(self.device)])
        return self.normalizer(apply_strong(batch, draws.rows(rows), self.augment, self.image_size))

    def two_views(self, seed: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> ViewBatch:
        """Both views of global step ``step``; with ``world_size`` > 1, rank ``rank``'s contiguous
        share (batch_size / world_size rows) of the global batch, identical to those rows of the
        single-process batch."""
        index = self.batch_indices(seed, step, batch_size)
        rows = shard_rows(index.shape[0], rank, world_size)
        g1 = step_generator(seed, step, stream=1, device=self.device)
        g2 = step_generator(seed, step, stream=2, device=self.device)
        return ViewBatch(self.strong(index, g1, rows), self.strong(index, g2, rows), index[rows])

    def clean_batches(self, batch_size: int = 1024, rank: int = 0, world_size: int = 1):
        """The subset in order, clean view, for K-means init and evaluation; with ``world_size`` > 1
        the rank's contiguous share [N r / W, N (r + 1) / W) (the split of the sharded loaders)."""
        lo, hi = len(self) * rank // world_size, len(self) * (rank + 1) // world_size
        for start in range(lo, hi, batch_size):
            index = torch.arange(start, min(start + batch_size, hi))
            yield index, self.clean(index)
