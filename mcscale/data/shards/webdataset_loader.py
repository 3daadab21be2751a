"""WebDataset + torchvision v2 loader over a prepared folder (``data.loader=webdataset``).

Reading: the ``webdataset`` library's tar iterator (``tarfile_samples``) and shuffle buffer, in
DataLoader workers. Splitting (see mcscale.data.shards.batch): the rank's contiguous range of the ordered
samples is cut again into one contiguous sub-range per worker; each worker opens only the shards its
sub-range touches and skips, undecoded, the samples of a boundary shard that are not its own.

Augmentation: mcscale.data.shards.transforms per sample in the workers, each view seeded from (seed,
epoch, sample index, view); the shard order and shuffle buffer are seeded from (seed, epoch, rank
range, worker). A given (seed, epoch, rank, world_size, num_workers) thus always gives the same
batches, which is what lets a resumed run replay an epoch exactly.

Checks: building the loader checks every shard's size and SHA-256 against the manifest, in the main
process, once per process (mcscale.data.shards.base, mcscale.data.shards.verify). Errors in a worker (a shard
changed or removed after that, an undecodable image) come back as data and are raised in the main
process as one-line DataErrors naming the shard and the fix.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mcscale.config import AugmentConfig
from mcscale.data.sources import DataError
from mcscale.data.shards import batch as B
from mcscale.data.shards.base import ShardLoader
from mcscale.data.shards.format import IMAGE_EXTS
from mcscale.data.shards.transforms import CleanTransform, strong_transform


class WebDatasetLoader(ShardLoader):
    def __init__(self, manifest_dir, batch_size: int, *, augment: AugmentConfig | None = None,
                 image_size: int | None = None, mean=None, std=None, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, with_clean: bool = False, shuffle_buffer: int = 1000,
                 pin_memory: bool = False):
        super().__init__(manifest_dir, batch_size, augment=augment, image_size=image_size, mean=mean, std=std,
                         rank=rank, world_size=world_size, seed=seed, with_clean=with_clean,
                         shuffle_buffer=shuffle_buffer)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def epoch(self, epoch: int):
        """Exactly ``steps_per_epoch`` ShardBatches of ``batch_size``: two strong views (+ clean)."""
        lo, hi = B.train_range(self.num_samples, self.rank, self.world_size, epoch)
        chunks = self._chunks("train", lo, hi, epoch)
        try:
            yield from _rebatch(chunks, [self.batch_size] * self.steps_per_epoch)
        finally:
            chunks.close()  # stops the workers: the rest of the range is not this epoch's

    def clean_batches(self, batch_size: int | None = None):
        """The rank's range once, in shard order, clean view only, padded as batch.py describes."""
        size = batch_size or self.batch_size
        per_rank, count = B.clean_layout(self.num_samples, self.world_size, size)
        lo, hi = B.rank_range(self.num_samples, self.rank, self.world_size)
        sizes = [min(size, per_rank - j * size) for j in range(count)]
        yield from _rebatch(self._chunks("clean", lo, hi, 0), sizes, pad=True)

    def _chunks(self, mode: str, lo: int, hi: int, epoch: int):
        pieces = [(str(s.path), s.start, s.num_samples) for s in self.manifest.shards
                  if s.start < hi and s.start + s.num_samples > lo]
        stream = _ShardStream(pieces, lo, hi, mode, epoch, self.seed, self.augment, self.image_size,
                              self.mean, self.std, self.with_clean or mode == "clean", self.shuffle_buffer,
                              min(self.batch_size, 256), self.manifest.channels, self.manifest.prepare_hint())
        # Worker torch seeds come from this generator; the views are seeded per sample anyway.
        g = torch.Generator().manual_seed(B.sample_seed(self.seed, epoch, self.rank, 7))
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=g,
                            pin_memory=self.pin_memory, prefetch_factor=2 if self.num_workers else None)
        return _checked(loader)


def _checked(loader):
    """Worker chunks; an error record from a worker becomes a one-line DataError here."""
    for chunk in loader:
        if "error" in chunk:
            raise DataError(chunk["error"])
        yield chunk


def _rebatch(chunks, sizes: list[int], pad: bool = False):
    """Cut the workers' chunks into batches of exactly ``sizes``; with ``pad``, a stream that runs
    short repeats its last sample (flagged) -- a range one sample shorter than the longest one."""
    keys = ("x1", "x2", "clean", "index", "labels")
    pending, have, last = [], 0, None
    for size in sizes:
        while have < size:
            chunk = next(chunks, None)
            if chunk is None:
                break
            pending.append(chunk)
            have += chunk["index"].shape[0]
        if have == 0 and last is None:
            raise DataError("sharded loader: a rank received no samples; fewer samples than ranks")
        if have:
            parts = {k: torch.cat([c[k] for c in pending]) if pending[0].get(k) is not None else None for k in keys}
            take = {k: None if v is None else v[:size] for k, v in parts.items()}
            rest = {k: None if v is None else v[size:] for k, v in parts.items()}
            pending, have = ([rest] if rest["index"].shape[0] else []), rest["index"].shape[0]
            out = B.ShardBatch(take["x1"], take["x2"], take["index"], take["labels"], take["clean"],
                               torch.zeros(take["index"].shape[0], dtype=torch.bool))
        else:
            out = B.ShardBatch(*(None if v is None else v[-1:] for v in (last.x1, last.x2, last.index, last.labels,
                                                                          last.clean)), torch.ones(1, dtype=torch.bool))
        if out.index.shape[0] < size:
            if not pad:
                raise DataError(f"sharded loader: the range ran out after {out.index.shape[0]} of {size} samples "
                                "of a batch; the shards hold fewer samples than the manifest says")
            out = B.pad_last(out, size)
        last = out
        yield out


class _ShardStream(IterableDataset):
    """One rank's range as worker chunks: dicts of stacked tensors, or {"error": one line}."""

    def __init__(self, pieces, lo, hi, mode, epoch, seed, augment, size, mean, std, clean, buffer, chunk,
                 channels, hint):
        self.pieces, self.lo, self.hi, self.mode, self.epoch, self.seed = pieces, lo, hi, mode, epoch, seed
        self.augment, self.size, self.mean, self.std, self.clean = augment, size, mean, std, clean
        self.buffer, self.chunk, self.channels, self.hint = buffer, chunk, channels, hint

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        lo, hi = B.rank_range(self.hi - self.lo, worker, workers)
        lo, hi = lo + self.lo, hi + self.lo
        plan = [(path, max(lo, start) - start, min(hi, start + n) - start)
                for path, start, n in self.pieces if start < hi and start + n > lo]
        train = self.mode == "train"
        rng = random.Random(B.sample_seed(self.seed, self.epoch, (self.lo << 8) + worker, 5))
        if train:
            rng.shuffle(plan)
        strong = strong_transform(self.augment, self.size, self.mean, self.std) if train else None
        clean = CleanTransform(self.size, self.mean, self.std) if self.clean else None
        main_process = info is None
        try:
            samples = self._read(plan)
            if train:
                import webdataset as wds

                samples = wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(samples)
            chunk = []
            for raw in samples:
                chunk.append(self._views(raw, strong, clean, main_process))
                if len(chunk) == self.chunk:
                    yield _stack(chunk)
                    chunk = []
            if chunk:
                yield _stack(chunk)
        except DataError as err:
            yield {"error": str(err)}

    def _read(self, plan):
        """Raw samples of each (shard, first, stop) piece, via webdataset's tar iterator."""
        from webdataset.tariterators import tarfile_samples

        for path, first, stop in plan:
            position = -1
            try:
                for sample in tarfile_samples([{"url": path}]):
                    position += 1
                    if position < first:
                        continue  # another worker's (or rank's) sample: skipped undecoded
                    if position >= stop:
                        break
                    yield self._fields(sample, path)
            except DataError:
                raise
            except Exception as err:
                first_arg = str(err.args[0]) if getattr(err, "args", None) else type(err).__name__
                if isinstance(err, FileNotFoundError):
                    raise DataError(f"{path}: shard missing; {self.hint}") from None
                raise DataError(f"{path}: unreadable shard ({type(err).__name__}: {first_arg.split(' @ ')[0]}); "
                                f"{self.hint}") from None
            if position + 1 < stop:
                raise DataError(f"{path}: holds {position + 1} samples, the manifest says at least {stop} "
                                f"(truncated or corrupt shard); {self.hint}")

    def _fields(self, sample: dict, path: str) -> dict:
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        try:
            index, label = int(sample["idx"]), int(sample["cls"])
        except (KeyError, ValueError):
            image = None
        if image is None:
            raise DataError(f"{path}: sample {sample.get('__key__')} lacks an image, cls or idx field "
                            f"(corrupt shard); {self.hint}")
        return {"image": image, "index": index, "label": label, "path": path}

    def _views(self, raw: dict, strong, clean, main_process: bool) -> dict:
        from torchvision.io import ImageReadMode, decode_image

        try:
            mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
            image = decode_image(torch.frombuffer(bytearray(raw["image"]), dtype=torch.uint8), mode=mode)
        except Exception as err:
            raise DataError(f"{raw['path']}: sample {raw['index']} does not decode ({type(err).__name__}); "
                            f"{self.hint}") from None
        out = {"index": raw["index"], "label": raw["label"], "x1": None, "x2": None, "clean": None}
        if strong is not None:
            state = torch.get_rng_state() if main_process else None  # keep the trainer's RNG untouched
            for view in (1, 2):
                torch.manual_seed(B.sample_seed(self.seed, self.epoch, raw["index"], view))
                out[f"x{view}"] = strong(image)
            if state is not None:
                torch.set_rng_state(state)
        if clean is not None:
            out["clean"] = clean(image)
        return out


def _stack(items: list[dict]) -> dict:
    def stack(key):
        return None if items[0][key] is None else torch.stack([it[key] for it in items])

    return {"x1": stack("x1"), "x2": stack("x2"), "clean": stack("clean"),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}
