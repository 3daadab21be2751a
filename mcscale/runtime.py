"""Small run-time helpers: devices, seeds, progress bars, atomic files, safe checkpoints, logs."""

from __future__ import annotations

import json
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm


class RunError(Exception):
    """A user-caused problem found at run time; its message is one line naming the file and the fix."""


def pick_device(name: str, force_cpu: bool = False) -> torch.device:
    if force_cpu or name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda was asked for but no CUDA device is visible; use --cpu or device=auto")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): resuming needs no generator state."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def progress(iterable=None, **kwargs):
    """A progress bar that stays quiet when output is not a terminal."""
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------- files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_torch_load(path: Path, map_location="cpu"):
    """Load a checkpoint without running code from it (weights_only); refuse anything else clearly."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"{path}: refused to load: it is not a plain-tensor checkpoint ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise RunError(f"{path}: unreadable or truncated checkpoint ({type(err).__name__}); delete it or resume from an older one") from None


class JsonlLog:
    """Append-only log, one JSON object per line, flushed each record."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            self._drop_records_after(truncate_after_step)
        self._handle = open(self.path, "a")

    def _drop_records_after(self, step: int) -> None:
        """On resume, forget records written after the checkpoint so the log matches the state."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.path, ("\n".join(kept) + "\n").encode() if kept else b"")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def prepare_out_dir(path: str | Path) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunError(f"--out {out}: cannot write there ({err.strerror}); pick a writable folder") from None
    return out
