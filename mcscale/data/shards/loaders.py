"""Pick a sharded loader by name (``data.loader``), degrading when an optional library is missing.

``dali`` without a working nvidia-dali falls back to ``webdataset`` with a one-line notice (the
ENGINEERING.md rule for optional dependencies); both read the same prepared folder, split the data
the same way and yield the same ShardBatch structure.
"""

from __future__ import annotations

import logging

from mcscale.data.sources import DataError

log = logging.getLogger(__name__)
KINDS = ("webdataset", "dali")


def build_loader(kind: str, manifest_dir, batch_size: int, *, num_workers: int = 2, **kwargs):
    """A WebDatasetLoader or DaliLoader; ``num_workers`` is DataLoader workers or DALI CPU threads.
    Other keyword arguments (augment, image_size, mean, std, rank, world_size, seed, with_clean,
    shuffle_buffer) are common to both."""
    if kind not in KINDS:
        raise DataError(f"data.loader: {kind!r} reads no shards; choose one of {', '.join(KINDS)} (or tensor)")
    if kind == "dali":
        from mcscale.data.shards.dali_loader import DaliLoader, dali_available

        if dali_available():
            return DaliLoader(manifest_dir, batch_size, num_threads=max(1, num_workers), **kwargs)
        log.warning("data.loader=dali: nvidia-dali is not importable here; using the webdataset loader "
                    "(pip install nvidia-dali-cuda130 for DALI)")
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise DataError("data.loader=webdataset: the webdataset package is missing; pip install webdataset, "
                        "or use data.loader=tensor") from None
    from mcscale.data.shards.webdataset_loader import WebDatasetLoader

    return WebDatasetLoader(manifest_dir, batch_size, num_workers=num_workers, **kwargs)
