"""Per-sample torchvision v2 twins of mcscale.augment's batched views (for DataLoader workers).

The strong view draws from the same distribution as ``mcscale.augment.strong_view`` with the same
AugmentConfig: RandomResizedCrop(crop_scale, crop_ratio) (10 attempts, centre-crop fallback), a
horizontal flip with flip_p, ColorJitter(brightness, contrast, saturation, hue) applied with jitter_p
in a random order per image, RandomGrayscale(grayscale_p). The differences are in resampling only:
torchvision rounds the crop box to whole pixels and resizes with antialiasing, strong_view samples
the exact box bilinearly. The clean view IS mcscale.augment.clean_view, on one image.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from mcscale.config import AugmentConfig
from mcscale.data.augment import clean_view


def strong_transform(cfg: AugmentConfig, size: int, mean, std) -> v2.Compose:
    """uint8 (C, H, W) -> normalised float32 (C, size, size). Randomness: torch's global generator."""
    ops = [
        # Crop first, on uint8: the colour operations then touch size x size pixels only.
        v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.ToDtype(torch.float32, scale=True),  # colour maths in float, as strong_view
    ]
    if cfg.jitter_p > 0 and any(v > 0 for v in cfg.jitter):
        b, c, s, h = cfg.jitter
        # ColorJitter draws a fresh operation order per call: per image, like strong_view.
        ops.append(v2.RandomApply([v2.ColorJitter(brightness=b or None, contrast=c or None,
                                                  saturation=s or None, hue=h or None)], p=cfg.jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=cfg.grayscale_p))  # a no-op on 1-channel images, as strong_view
    ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)


class CleanTransform:
    """uint8 (C, H, W) -> normalised float32 (C, size, size): resize the shorter side, centre crop."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = clean_view(image.unsqueeze(0).float().div_(255.0), self.size)[0]
        return (x - self.mean) / self.std
