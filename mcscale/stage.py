"""What every stage (pretrain, cluster, eval) sets up the same way: run folder, device, data, checkpoints."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from mcscale import config as config_mod
from mcscale.data.sources import long_tail, load_source
from mcscale.data.views import InMemoryViews, augment_config
from mcscale.runtime import JsonlLog, RunError, atomic_torch_save, atomic_write_bytes, safe_torch_load
from mcscale.tb import ScalarWriter

CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
KEEP_CHECKPOINTS = 2


class RunLogger:
    """log.jsonl, and TensorBoard when asked; on resume both forget what came after the checkpoint."""

    def __init__(self, run_dir: Path, step: int, tensorboard: bool, resumed: bool):
        self.jsonl = JsonlLog(Path(run_dir) / "log.jsonl", truncate_after_step=step)
        self.tb = ScalarWriter(run_dir, tensorboard, purge_step=step if resumed else None)

    def step(self, record: dict) -> None:
        self.jsonl.write(record)
        self.tb.step(record)

    def eval(self, step: int, metrics: dict) -> None:
        self.jsonl.write({"step": step, "eval": metrics})
        self.tb.eval(step, metrics)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def write_config(out: Path, cfg: config_mod.Config, extra: dict | None = None) -> None:
    values = config_mod.to_dict(cfg)
    if extra:
        values["run"] = extra
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(values, sort_keys=False).encode())


def read_run_config(run_dir: Path) -> tuple[config_mod.Config, dict]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path}: not found; --run must be a folder written by `mcscale cluster` or `pretrain`")
    values = yaml.safe_load(path.read_text()) or {}
    extra = values.pop("run", {}) or {}
    return config_mod.from_dict(values), extra


@dataclass
class ShardedSubset:
    """What the stages need of a prepared (sharded) subset: its labels and number of classes."""

    labels: np.ndarray
    num_classes: int


def _load_sharded_views(cfg: config_mod.Config, device: torch.device, batch_size: int):
    from mcscale.shards.batch import StreamViews
    from mcscale.shards.loaders import build_loader

    d = cfg.data
    loader = build_loader(
        d.loader, d.shards, batch_size, num_workers=d.num_workers, augment=augment_config(cfg.augment),
        image_size=d.image_size, seed=cfg.seed,
    )
    views = StreamViews(loader, device)
    labels = views.labels.numpy()
    counts = np.bincount(labels, minlength=int(labels.max()) + 1).tolist()
    return ShardedSubset(labels, len(counts)), counts, views


def load_views(cfg: config_mod.Config, device: torch.device, batch_size: int | None = None):
    """The long-tailed subset of the configured source: in-memory views on ``device`` (data.loader
    tensor), or a sharded loader's stream (webdataset / dali) built for ``batch_size``."""
    d = cfg.data
    if d.loader != "tensor":
        return _load_sharded_views(cfg, device, batch_size or cfg.cluster.batch_size)
    source = load_source(
        d.source, d.root, image_size=d.load_size, split=d.split, labels_file=d.labels_file, num_workers=d.num_workers
    )
    if d.imbalance_ratio is None:  # the source already is the subset (e.g. an ImageNet-LT list)
        subset = source
        counts = np.bincount(source.labels[source.labels >= 0], minlength=source.num_classes).tolist()
    else:
        subset, counts = long_tail(source, d.imbalance_ratio, d.n_max)
    views = InMemoryViews(subset, augment_config(cfg.augment), device, d.image_size)
    return subset, counts, views


# ---------------------------------------------------------------- checkpoints
def checkpoint_paths(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(run_dir).glob("ckpt-*.pt"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, state: dict) -> Path:
    path = Path(run_dir) / f"ckpt-{step:07d}.pt"
    atomic_torch_save(path, state)
    for _, old in checkpoint_paths(run_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads. A newer one that does not (truncated, or not plain tensors)
    is renamed to ``*.pt.unusable`` with a notice: kept for inspection, out of the way of the
    keep-the-last-two pruning of the run that now continues."""
    for _, path in reversed(checkpoint_paths(run_dir)):
        try:
            return safe_torch_load(path), path
        except RunError as err:
            aside = path.with_name(path.name + ".unusable")
            path.rename(aside)
            print(f"mcscale: skipping checkpoint {path.name} (renamed to {aside.name}): {err}")
    return None


RUN_FILES = ("log.jsonl", "metrics.json", "encoder.pt")


def start_fresh(run_dir: Path, overwrite: bool = False) -> None:
    """A new run must not mix with an old one: refuse a folder with checkpoints unless told to overwrite."""
    old = checkpoint_paths(run_dir)
    if old and not overwrite:
        raise RunError(
            f"--out {run_dir}: holds checkpoints of an earlier run ({old[-1][1].name});"
            " add --resume to continue it or pick a new --out"
        )
    for _, path in old:
        path.unlink()
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def restore_latest(run_dir: Path, components: dict, identity_key: str, identity: dict) -> dict | None:
    """Load the newest good checkpoint into ``components`` (name -> object with load_state_dict).

    Returns the checkpoint (for its step and other plain values), or None when there is none.
    """
    found = latest_checkpoint(run_dir)
    if found is None:
        print(f"mcscale: no checkpoint in {run_dir}; starting from the beginning")
        return None
    state, path = found
    check_compatible(state[identity_key], identity, path)
    for name, component in components.items():
        component.load_state_dict(state[name])
    print(f"mcscale: resumed from {path.name} at step {state['step']}")
    return state


def check_compatible(saved: dict, expected: dict, path: Path) -> None:
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise RunError(
                f"{path}: checkpoint has {key}={saved[key]!r} but this run has {key}={value!r};"
                " use a fresh --out folder or the original config"
            )


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
