"""What the WebDataset and the DALI loader derive the same way from a prepared folder's manifest."""

from __future__ import annotations

from mcscale.config import AugmentConfig
from mcscale.data.sources import DataError
from mcscale.data.shards import batch as B
from mcscale.data.shards.format import load_manifest
from mcscale.data.shards.verify import verify_checksums


class ShardLoader:
    """The common part of both loaders: the rank split, the manifest, the view size, the normalisation
    and the number of steps per epoch. Subclasses add how the shards are read (``epoch``,
    ``clean_batches``).

    Building one checks the folder: every shard present with its manifest size (load_manifest), then,
    after the cheaper checks, every shard's SHA-256 (and with ``need_index`` every DALI index's), with
    the per-process and on-disk cache of mcscale.data.shards.verify: a bad file is a one-line DataError
    naming it and the `mcscale prepare` command that rewrites it. Each rank checks every shard."""

    def __init__(self, manifest_dir, batch_size: int, *, augment: AugmentConfig | None, image_size: int | None,
                 mean, std, rank: int, world_size: int, seed: int, with_clean: bool, shuffle_buffer: int,
                 need_index: bool = False):
        B.check_split(rank, world_size, batch_size)
        self.manifest = load_manifest(manifest_dir, need_index=need_index)  # missing / truncated shards: DataError
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.augment = augment or AugmentConfig()
        h, w, _ = self.manifest.image_shape
        self.stored_size = int(h) if h is not None and h == w else None  # None: not one square size
        if image_size is None and self.stored_size is None:
            raise DataError(f"{self.manifest.root / 'manifest.json'}: images are {h}x{w} (not one square size); "
                            "set data.image_size")
        self.image_size = int(image_size or self.stored_size)
        self.mean = list(self.manifest.mean if mean is None else mean)
        self.std = list(self.manifest.std if std is None else std)
        self.seed, self.with_clean, self.shuffle_buffer = seed, with_clean, shuffle_buffer
        self.steps_per_epoch = B.steps_per_epoch(self.num_samples, world_size, batch_size)
        verify_checksums(self.manifest, need_index, show_progress=rank == 0)  # same-size corruption: DataError

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def channels(self) -> int:
        return self.manifest.channels
