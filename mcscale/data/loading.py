"""The long-tailed subset of the configured source as the views a stage trains on: in memory
(data.loader tensor) or streamed from prepared shards (webdataset / dali)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcscale import config as config_mod
from mcscale.data.sources import load_source, long_tail
from mcscale.data.augment import Normalizer
from mcscale.data.views import InMemoryViews
from mcscale.models.pretrained import preprocessing


@dataclass
class ShardedSubset:
    """What the stages need of a prepared (sharded) subset: its labels and number of classes."""

    labels: np.ndarray
    num_classes: int


def _load_sharded_views(cfg: config_mod.Config, device: torch.device, batch_size: int, rank: int, world_size: int):
    from mcscale.data.shards.batch import StreamViews
    from mcscale.data.shards.loaders import build_loader

    d = cfg.data
    loader = build_loader(
        d.loader, d.shards, batch_size // world_size, num_workers=d.num_workers, augment=cfg.augment,
        image_size=d.image_size, seed=cfg.seed, rank=rank, world_size=world_size,
    )
    views = StreamViews(loader, device)
    labels = views.labels.numpy()
    counts = np.bincount(labels, minlength=int(labels.max()) + 1).tolist()
    return ShardedSubset(labels, len(counts)), counts, views


def load_views(cfg: config_mod.Config, device: torch.device, batch_size: int | None = None, parallel=None):
    """The long-tailed subset of the configured source: in-memory views on ``device`` (data.loader
    tensor; every rank holds it all and takes its rows of each global batch), or a sharded loader's
    stream (webdataset / dali) built for this rank's share of the global ``batch_size``."""
    d = cfg.data
    if d.loader != "tensor":
        rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
        return _load_sharded_views(cfg, device, batch_size or cfg.cluster.batch_size, rank, world)
    source = load_source(
        d.source, d.root, image_size=d.load_size, split=d.split, labels_file=d.labels_file, num_workers=d.num_workers
    )
    if d.imbalance_ratio is None:  # the source already is the subset (e.g. an ImageNet-LT list)
        subset = source
        counts = np.bincount(source.labels[source.labels >= 0], minlength=source.num_classes).tolist()
    else:
        subset, counts = long_tail(source, d.imbalance_ratio, d.n_max)
    size, norm = (None, None)
    if subset.kind == "image":  # the encoder's own preprocessing (pretrained weights: 224 px, ImageNet mean / std)
        size, norm = preprocessing(cfg.model.backbone, cfg.model.weights, d.image_size, subset.images.shape[-1])
    if norm is None:
        return subset, counts, InMemoryViews(subset, cfg.augment, device, size)
    # fixed statistics: nothing to fit (fitting at the stored size skips a 224 px copy of the whole set)
    views = InMemoryViews(subset, cfg.augment, device)
    views.image_size, views.normalizer = size, Normalizer(*norm)
    return subset, counts, views
