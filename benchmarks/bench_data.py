"""`mcscale bench data`: images per second of the three loaders (tensor, webdataset, dali).

Each configuration generates a few hundred smooth random JPEGs (an image folder), writes them with
`mcscale prepare` (JPEG bytes kept as they are), and times whole training epochs of two strong views
per sample: one warm-up epoch, then ``repeats`` timed epochs; the median is reported, with the ratio to
the tensor loader measured in the same run. Epochs include the WebDataset loader's worker start-up
(it happens every epoch) but not the one-off construction of any loader.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mcscale.config import AugmentConfig
from mcscale.files import write_csv

# (image size, number of images, batch size): a few seconds per loader on two CPU cores.
CONFIGS = ((32, 512, 64), (224, 192, 32))
FIELDS = ["device", "torch", "torchvision", "webdataset", "dali", "cpu", "loader", "image_size", "images",
          "batch_size", "workers", "repeats", "images_per_s", "median_s_per_epoch", "ratio_vs_tensor", "error"]


def generate_jpegs(folder: Path, size: int, count: int, classes: int = 4, seed: int = 0) -> None:
    """Smooth random colour fields plus a little noise: JPEG sizes like those of photographs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"c{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=90)


def _time_epochs(make_epoch, repeats: int, sync) -> tuple[float, int]:
    """Median seconds of one epoch (after one warm-up) and the samples an epoch yields."""
    samples = sum(b.index.shape[0] for b in make_epoch(0))
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        for _ in make_epoch(r + 1):
            pass
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), samples


def _tensor_epochs(root: Path, size: int, batch: int, device: str):
    from mcscale.data.sources import load_source
    from mcscale.data.views import InMemoryViews

    views = InMemoryViews(load_source("imagefolder", str(root), image_size=size), AugmentConfig(),
                          torch.device(device))
    steps = views.steps_per_epoch(batch)
    return lambda epoch: (views.two_views(0, epoch * steps + s, batch) for s in range(steps))


def _run_config(size: int, count: int, batch: int, device: str, repeats: int, env: dict, work: Path) -> list[dict]:
    from mcscale.data.shards.dali_loader import DaliLoader, dali_available
    from mcscale.data.shards.prepare import prepare
    from mcscale.data.shards.webdataset_loader import WebDatasetLoader

    root, shards = work / f"jpeg{size}", work / f"shards{size}"
    generate_jpegs(root, size, count)
    prepare("imagefolder", str(root), None, None, 64, shards, show_progress=False)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    workers = min(2, os.cpu_count() or 1)
    loaders = [("tensor", "-", lambda: _tensor_epochs(root, size, batch, device)),
               ("webdataset", workers, lambda: WebDatasetLoader(shards, batch, num_workers=workers,
                                                                pin_memory=cuda).epoch)]
    if dali_available():
        loaders.append(("dali", workers, lambda: DaliLoader(shards, batch, num_threads=workers,
                                                             device="gpu" if cuda else "cpu").epoch))
    rows, base = [], None
    for name, nworkers, build in loaders:
        row = dict(env, loader=name, image_size=size, images=count, batch_size=batch, workers=nworkers,
                   repeats=repeats, images_per_s="", median_s_per_epoch="", ratio_vs_tensor="", error="")
        try:
            seconds, samples = _time_epochs(build(), repeats, sync)
            rate = samples / seconds
            base = rate if name == "tensor" else base
            row.update(images_per_s=round(rate, 1), median_s_per_epoch=round(seconds, 3),
                       ratio_vs_tensor=round(rate / base, 3) if base else "")
        except Exception as err:  # one loader failing (e.g. DALI without its GPU runtime) keeps the others
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def _environment(device: str) -> dict:
    import torchvision

    try:
        import webdataset

        wds_version = getattr(webdataset, "__version__", "installed")
    except ImportError:
        wds_version = "none"
    try:
        import nvidia.dali

        dali_version = nvidia.dali.__version__
    except ImportError:
        dali_version = "none"
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "webdataset": wds_version, "dali": dali_version, "cpu": cpu}


def run(out_csv: str, device: str | None = None, repeats: int = 3,
        configs: Sequence[tuple[int, int, int]] = CONFIGS, threads: int | None = None) -> list[dict]:
    """Benchmark every (image size, images, batch size) of ``configs``; write ``out_csv``.

    ``threads``: torch threads of the main process (the tensor loader's augmentations), default 1 on
    CPU -- on a busy shared machine, OpenMP barrier stalls otherwise cost hundreds of ms per batch.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or (saved if device.startswith("cuda") else 1))
    try:
        return _run(out_csv, device, repeats, configs)
    finally:
        torch.set_num_threads(saved)


def _run(out_csv, device, repeats, configs) -> list[dict]:
    env = _environment(device)
    print(f"device: {env['device']} ({env['cpu']}) | torch {env['torch']} | torchvision {env['torchvision']} | "
          f"webdataset {env['webdataset']} | dali {env['dali']}")
    print(HEADER)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mcscale-bench-data-") as work:
        for size, count, batch in configs:
            rows += _run_config(size, count, batch, device, max(1, repeats), env, Path(work))
    write_csv(out_csv, FIELDS, rows)
    return rows


_COLUMNS = (("loader", 10), ("image_size", 5), ("images", 6), ("batch_size", 5), ("workers", 7),
            ("images_per_s", 12), ("median_s_per_epoch", 9), ("ratio_vs_tensor", 8), ("error", 0))
HEADER = " ".join(c.rjust(w) if w else c for c, w in _COLUMNS)


def format_row(row: dict) -> str:
    return " ".join(str(row[c]).rjust(w) if w else str(row[c]) for c, w in _COLUMNS).rstrip()
