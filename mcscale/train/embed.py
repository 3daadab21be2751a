"""`mcscale embed`: the clean view of the configured data set through an encoder (a pretrained weights
file, a BYOL run, identity), written to ``OUT/features.npy`` (float32, N x D) and ``OUT/labels.npy``,
so a data set is embedded once and clustered many times (``data.source: embeddings``).

The features go into a memory-mapped ``.npy`` chunk by chunk (a set larger than memory never is one
array), under a temporary name renamed at the end; bf16 autocast on CUDA."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from mcscale import parallel
from mcscale.config import Config
from mcscale.data.loading import load_views
from mcscale.errors import RunError
from mcscale.files import prepare_out_dir
from mcscale.progress import progress
from mcscale.train.encoders import open_encoder

FEATURES_FILE, LABELS_FILE = "features.npy", "labels.npy"


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_embed(cfg: Config, encoder_dir: str | Path | None, out_dir: str | Path, force_cpu: bool = False,
              batch_size: int = 256) -> Path:
    """Embed the long-tailed subset the config selects (every sample with data.imbalance_ratio=null);
    returns the folder. One process (under a launcher, rank 0 would need the others' shares: refused)."""
    if parallel.launched_world_size() > 1:
        raise RunError("embed runs in one process; start it without accelerate launch / torchrun")
    if batch_size < 1:
        raise RunError(f"--batch-size {batch_size}: must be at least 1")
    device = parallel.pick_device(cfg.device, force_cpu)
    torch.manual_seed(cfg.seed)
    subset, _, views = load_views(cfg, device, batch_size)
    encoder, arch = open_encoder(cfg, encoder_dir, views, device)
    encoder.eval()
    out = prepare_out_dir(out_dir)
    n, dim = len(views), arch["feature_dim"]
    tmp = out / f".{FEATURES_FILE}.tmp.npy"
    features = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    bar = progress(total=n, desc="embed", unit="img", unit_scale=True)
    try:
        for index, x in views.clean_batches(batch_size):
            with _autocast(device):
                f = encoder(x)
            features[index.numpy()] = f.float().cpu().numpy()
            bar.update(len(index))
        features.flush()
    finally:
        bar.close()
        del features
    tmp.replace(out / FEATURES_FILE)
    labels = np.asarray(subset.labels, dtype=np.int64)
    if (labels >= 0).all():  # a source without labels (-1) gets no labels.npy
        label_tmp = out / f".{LABELS_FILE}.tmp.npy"
        np.save(label_tmp, labels)
        label_tmp.replace(out / LABELS_FILE)
    return out
