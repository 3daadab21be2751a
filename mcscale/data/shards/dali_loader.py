"""NVIDIA DALI loader over a prepared folder (``data.loader=dali``).

Reading: ``fn.readers.webdataset`` over every tar with its index file; every rank passes the same full
ordered list with ``shard_id=rank, num_shards=world_size``, ``pad_last_batch=True`` and a named
reader, so DALI's per-sample split is exactly mcscale.data.shards.batch's (and the WebDataset loader's).
Decoding: ``fn.decoders.image`` on the GPU ("mixed") when one is used, else on the CPU
(``device_id=None``); the augmentations then run where the images are.

The strong view follows mcscale.augment.strong_view with the same AugmentConfig: random resized crop
(area fraction ~ U(crop_scale), log-uniform aspect ratio, 10 attempts), horizontal flip, then with
probability jitter_p brightness, contrast (blend with the image's mean grey, as torchvision),
saturation (blend with the luma image, exactly torchvision's) and hue, then grey-scale with
grayscale_p (luma on all channels). Two known differences, both small: (1) the jitter order is fixed
(b, c, s, h) where torchvision draws one per image -- without clipping brightness, contrast and
saturation commute, so only clipping makes the order matter; (2) hue uses DALI's fn.hsv, a rotation
about the grey axis in a linear colour space, instead of torchvision's HSV hue shift.

The ``.cls`` / ``.idx`` fields arrive as raw ASCII bytes: they are zero-padded in the graph
(fn.pad) and decoded to integers on the host.

Checks: building the loader checks every shard's and every index file's size and SHA-256 against the
manifest (mcscale.data.shards.base, mcscale.data.shards.verify), so a same-size corrupt shard or a stale index
(whose offsets would silently read the wrong bytes) is refused before DALI opens them.
"""

from __future__ import annotations

import re

import torch

from mcscale.config import AugmentConfig
from mcscale.data.sources import DataError
from mcscale.data.shards import batch as B
from mcscale.data.shards.base import ShardLoader
from mcscale.data.shards.format import sha256_file

LUMA = (0.299, 0.587, 0.114)  # as mcscale.augment / torchvision
READER = "reader"
_SHARD_PATH = re.compile(r"[^\s\"']*shard-\d{6}\.(?:tar|idx)")
_OPERATOR = re.compile(r"Error in \w+ operator `([^`]+)`")
_DATA_OPS = ("nvidia.dali.fn.readers", "nvidia.dali.fn.decoders", "nvidia.dali.fn.peek_image_shape")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA runtime under the wheel
        return False
    return True


class DaliLoader(ShardLoader):
    def __init__(self, manifest_dir, batch_size: int, *, augment: AugmentConfig | None = None,
                 image_size: int | None = None, mean=None, std=None, rank: int = 0, world_size: int = 1,
                 num_threads: int = 2, seed: int = 0, with_clean: bool = False, shuffle_buffer: int = 1000,
                 device: str = "auto", device_id: int | None = None):
        if device not in ("auto", "cpu", "gpu"):
            raise DataError(f"dali device: {device!r}; choose auto, cpu or gpu")
        use_gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
        if use_gpu and not torch.cuda.is_available():
            raise DataError("dali device gpu: no CUDA device is visible; use device cpu")
        super().__init__(manifest_dir, batch_size, augment=augment, image_size=image_size, mean=mean, std=std,
                         rank=rank, world_size=world_size, seed=seed, with_clean=with_clean,
                         shuffle_buffer=shuffle_buffer, need_index=True)  # missing index: DataError
        self.num_threads = num_threads
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) if use_gpu else None
        self._train = None  # (iterator, next epoch it is positioned at) while at an epoch boundary
        self._clean = {}

    @property
    def gpu(self) -> bool:
        return self.device_id is not None

    # ------------------------------------------------------------ iteration
    def epoch(self, epoch: int):
        """Exactly ``steps_per_epoch`` ShardBatches of ``batch_size``: two strong views (+ clean)."""
        if self._train is None or self._train[1] != epoch:
            # DALI's reader moves on one range per epoch by itself; starting (or resuming) at ``epoch``
            # means starting at range (rank + epoch) % W.
            shard = (self.rank + epoch) % self.world_size
            self._train = (self._iterator(True, self.batch_size, shard, B.sample_seed(self.seed, epoch, self.rank, 11)),
                           epoch)
        iterator = self._train[0]
        self._train = None  # mid-epoch: an abandoned epoch forces a rebuild
        for _ in range(self.steps_per_epoch):
            out = self._next(iterator)
            if out is None or out["idx"].shape[0] != self.batch_size:
                raise DataError(f"{self.manifest.root}: DALI gave a short training batch; the shards hold "
                                f"fewer samples than the manifest says; {self.manifest.prepare_hint()}")
            yield self._batch(out)
        self._finish(iterator)  # the unused rest of this range: read, dropped
        self._train = (iterator, epoch + 1)

    def clean_batches(self, batch_size: int | None = None):
        """The rank's range once, in order, clean view only, padded as batch.py describes."""
        size = batch_size or self.batch_size
        per_rank, count = B.clean_layout(self.num_samples, self.world_size, size)
        iterator = self._clean.pop(size, None) or self._iterator(False, size, self.rank, 0)
        last = None
        for j in range(count):
            out = self._next(iterator)
            want = min(size, per_rank - j * size)
            if out is not None and out["idx"].shape[0]:
                batch = self._batch(out)
            elif last is not None:  # a range one sample shorter, ending on a batch boundary
                batch = B.ShardBatch(None, None, last.index[-1:], last.labels[-1:], last.clean[-1:],
                                     torch.ones(1, dtype=torch.bool))
            else:
                raise DataError("sharded loader: a rank received no samples; fewer samples than ranks")
            batch = B.pad_last(batch, want)
            last = batch
            yield batch
        self._finish(iterator)
        self._clean[size] = iterator

    # ------------------------------------------------------------ DALI plumbing
    def _iterator(self, train: bool, batch_size: int, shard_id: int, seed: int):
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        names = (["x1", "x2"] if train else []) + (["clean"] if self.with_clean or not train else []) + ["cls", "idx"]

        # On the CPU run synchronously: the asynchronous executor was seen to hang or abort once
        # under heavy load on a 2-core machine, and there is no GPU work to overlap with anyway.
        on_gpu = self.device_id is not None
        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      seed=seed % 2**31, prefetch_queue_depth=2 if on_gpu else 1,
                      exec_async=on_gpu, exec_pipelined=on_gpu)
        def pipe():
            return self._graph(train, shard_id)

        try:
            p = pipe()
            p.build()
            return DALIGenericIterator([p], names, reader_name=READER, auto_reset=False,
                                       last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as err:
            raise self._error(err) from None

    def _graph(self, train: bool, shard_id: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        shards = self.manifest.shards
        encoded, cls, idx = fn.readers.webdataset(
            paths=[str(s.path) for s in shards], index_paths=[str(s.index_path) for s in shards],
            ext=["png;jpg", "cls", "idx"], missing_component_behavior="error", name=READER,
            shard_id=shard_id, num_shards=self.world_size, pad_last_batch=True,
            random_shuffle=train, initial_fill=max(1, min(self.shuffle_buffer, self.num_samples)),
            stick_to_shard=not train)
        images = fn.decoders.image(self._parsed_first(encoded), device="mixed" if self.gpu else "cpu",
                                   output_type=types.GRAY if self.channels == 1 else types.RGB)
        outputs = []
        if train:
            outputs += [self._strong(images), self._strong(images)]
        if self.with_clean or not train:
            outputs.append(self._clean_view(images))
        return (*outputs, fn.pad(cls, fill_value=0), fn.pad(idx, fill_value=0))

    def _parsed_first(self, encoded):
        """``encoded`` unchanged, but only after fn.peek_image_shape has parsed every image header.

        DALI 2.4's CPU image decoder parses the headers of a batch in blocks: the pipeline's thread
        pool takes all blocks but one, the calling thread parses that one, and only then waits for
        the pool. When a header in the calling thread's block is unreadable (a shard damaged after
        the loader was built), the exception leaves the decoder's RunImplImpl without that wait, and
        a pool thread then runs a parse task whose closure lived in the unwound stack frame: a
        segfault in ``ImageDecoder<CPUBackend>::RunImplImpl::{lambda(int, int, int)}`` on a pool
        thread, or a corrupted stack that crashes the process later in unrelated code (9 runs in 30
        of tests/test_shards.py::test_corrupt_shard_content_is_one_line[dali]).
        fn.peek_image_shape parses the same headers with the same nvImageCodec call, all of them in
        pool tasks that it waits for before it rethrows, so an unreadable header raises a clean
        error there and the decoder never runs on that batch. The ``+ 0`` (a per-sample scalar from
        the parsed shape) makes the decoder's input depend on the parse, so DALI keeps the parse in
        the graph and runs it first.
        """
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        shape = fn.peek_image_shape(encoded, dtype=types.INT64)
        return encoded + fn.cast(shape[0] * 0, dtype=types.UINT8)

    def _strong(self, images):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.math import clamp

        cfg, rgb = self.augment, self.channels == 3
        x = fn.random_resized_crop(images, size=[self.image_size, self.image_size], random_area=list(cfg.crop_scale),
                                   random_aspect_ratio=list(cfg.crop_ratio), num_attempts=10, antialias=True)
        x = fn.cast(x, dtype=types.FLOAT) * (1.0 / 255.0)
        b, c, s, h = cfg.jitter
        if cfg.jitter_p > 0 and max(cfg.jitter) > 0:
            # "with probability jitter_p": a skipped image gets identity factors (1, 1, 1, hue 0).
            apply = self._coin(cfg.jitter_p)
            if b > 0:
                f = self._factor(apply, b)
                x = clamp(f * x, 0.0, 1.0)
            if c > 0:
                f = self._factor(apply, c)
                mean = fn.reductions.mean(self._luma(x, 1) if rgb else x)
                x = clamp(f * x + (1.0 - f) * mean, 0.0, 1.0)
            if rgb and s > 0:
                f = self._factor(apply, s)
                x = clamp(f * x + (1.0 - f) * self._luma(x, 3), 0.0, 1.0)
            if rgb and h > 0:
                degrees = apply * fn.random.uniform(range=[-h, h]) * 360.0
                x = clamp(fn.hsv(x, hue=degrees, dtype=types.FLOAT), 0.0, 1.0)
        if rgb and cfg.grayscale_p > 0:
            grey = self._dev(self._coin(cfg.grayscale_p))
            x = x + grey * (self._luma(x, 3) - x)
        mirror = fn.random.coin_flip(probability=cfg.flip_p)
        return fn.crop_mirror_normalize(x, mirror=mirror, mean=self.mean, std=self.std, dtype=types.FLOAT,
                                        output_layout="CHW")

    def _clean_view(self, images):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        size = self.image_size
        if self.stored_size != size:  # as mcscale.augment.clean_view: shorter side, then centre crop
            images = fn.resize(images, resize_shorter=size, antialias=True)
        return fn.crop_mirror_normalize(images, crop=(size, size), mean=[m * 255 for m in self.mean],
                                        std=[s * 255 for s in self.std], dtype=types.FLOAT, output_layout="CHW")

    def _factor(self, apply, strength: float):
        """U[max(0, 1 - strength), 1 + strength] where ``apply`` is 1, else exactly 1 (identity)."""
        import nvidia.dali.fn as fn

        return self._dev(1.0 + apply * (fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength]) - 1.0))

    def _coin(self, p: float):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        return fn.cast(fn.random.coin_flip(probability=p), dtype=types.FLOAT)  # coin_flip has no float type

    def _luma(self, x, channels: int):
        import nvidia.dali.fn as fn

        return fn.coord_transform(x, M=list(LUMA) * channels)  # HWC -> HW(channels)

    def _dev(self, node):
        """Per-sample factors are drawn on the CPU; move them next to GPU images."""
        return node.gpu() if self.gpu else node

    def _next(self, iterator):
        try:
            return next(iterator)[0]
        except StopIteration:
            return None
        except RuntimeError as err:
            raise self._error(err) from None

    def _finish(self, iterator) -> None:
        while self._next(iterator) is not None:
            pass
        iterator.reset()

    def _batch(self, out: dict) -> B.ShardBatch:
        return B.ShardBatch(out.get("x1"), out.get("x2"), B.decode_ascii(out["idx"]), B.decode_ascii(out["cls"]),
                            out.get("clean"), torch.zeros(out["idx"].shape[0], dtype=torch.bool))

    def _error(self, err: Exception) -> Exception:
        """A data problem (raised by the reader or the decoder, or naming a shard or index) becomes one
        line naming the shard; anything else (a bug, a CUDA problem) is left as it is."""
        text = str(err)
        op = _OPERATOR.search(text)
        where = _SHARD_PATH.search(text)
        if not (where or (op and op.group(1).startswith(_DATA_OPS)) or "index file" in text):
            return err
        detail = text.split("encountered:", 1)[-1]
        detail = " ".join(re.sub(r"Current pipeline object.*", "", detail, flags=re.S).split())[:200]
        if where:
            name = where.group(0)
        else:  # the decoder does not say which sample: find the shard whose bytes changed
            bad = next((s.path for s in self.manifest.shards
                        if not s.path.is_file() or s.path.stat().st_size != s.bytes or sha256_file(s.path) != s.sha256),
                       None)
            name = str(bad) if bad else f"{self.manifest.root} (every shard matches its checksum)"
        return DataError(f"{name}: DALI could not read it ({detail}); {self.manifest.prepare_hint()}")
