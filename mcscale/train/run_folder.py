"""The run folder: the one place that reads and writes config.yaml, log.jsonl, checkpoints,
encoder.pt, predictions and the folder's lock."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from mcscale import config as config_mod
from mcscale.errors import RunError
from mcscale.files import (
    JsonlLog,
    atomic_torch_save,
    atomic_write_bytes,
    checksum_path,
    prepare_out_dir,
    read_jsonl,
    safe_torch_load,
)
from mcscale.models.byol import build_byol
from mcscale.train.tensorboard import ScalarWriter

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


def read_run_yaml(run_dir: Path, who: str = "`mcscale cluster` or `pretrain`") -> tuple[dict, dict]:
    """The one reader of config.yaml: (its raw values without the ``run:`` block, that block). Raw, so
    that reports and comparisons still read runs written before a key was added or renamed."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{path}: not found; --run must be a folder written by {who}")
    values = yaml.safe_load(path.read_text()) or {}
    return values, values.pop("run", {}) or {}


def read_run_config(run_dir: Path) -> tuple[config_mod.Config, dict]:
    """The run's configuration, typed and validated, and its ``run:`` block."""
    values, extra = read_run_yaml(run_dir)
    return config_mod.from_dict(values), extra


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of a run ({} before the stage has written one)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: not valid JSON ({err.msg})") from None


# ---------------------------------------------------------------- checkpoints
def checkpoint_paths(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(run_dir).glob("ckpt-*.pt"):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, state: dict) -> Path:
    """``ckpt-NNNNNNN.pt`` and its ``.sha256`` sidecar; only the newest KEEP_CHECKPOINTS are kept."""
    path = Path(run_dir) / f"ckpt-{step:07d}.pt"
    atomic_torch_save(path, state, checksum=True)
    for _, old in checkpoint_paths(run_dir)[:-KEEP_CHECKPOINTS]:
        _remove_with_checksum(old)
    return path


def save_best(run_dir: Path, state: dict) -> Path:
    """``best.pt`` and its ``.sha256`` sidecar, replaced atomically (not a ckpt-*: never resumed from)."""
    path = Path(run_dir) / BEST_CHECKPOINT
    atomic_torch_save(path, state, checksum=True)
    return path


def read_best(run_dir: Path) -> dict | None:
    """best.json of a run (None when absent or unreadable: the best is then searched afresh)."""
    path = Path(run_dir) / BEST_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _remove_with_checksum(path: Path) -> None:
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def _set_aside(path: Path, suffix: str) -> Path:
    """Rename a checkpoint (and its sidecar) to ``*.pt<suffix>``: kept for inspection, no longer a
    checkpoint, so out of the way of the keep-the-last-two pruning."""
    aside = path.with_name(path.name + suffix)
    path.rename(aside)
    sidecar = checksum_path(path)
    if sidecar.exists():
        sidecar.rename(sidecar.with_name(sidecar.name + suffix))
    return aside


def latest_checkpoint(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads. A newer one that does not (truncated, not plain tensors, or
    not matching its sha256 sidecar) is renamed to ``*.pt.unusable`` with a notice."""
    for _, path in reversed(checkpoint_paths(run_dir)):
        try:
            return safe_torch_load(path), path
        except RunError as err:
            aside = _set_aside(path, ".unusable")
            print(f"mcscale: skipping checkpoint {path.name} (renamed to {aside.name}): {err}")
    return None


def chosen_checkpoint(run_dir: Path, value: str | Path) -> Path:
    """``--resume PATH``: one of the ``ckpt-NNNNNNN.pt`` files of ``run_dir`` (a bare name is looked up there)."""
    path = Path(value)
    if path.parent == Path("."):
        path = Path(run_dir) / path
    if not CHECKPOINT_PATTERN.match(path.name) or path.resolve().parent != Path(run_dir).resolve():
        raise RunError(f"--resume {value}: not a checkpoint of --out {run_dir}; give one of its ckpt-NNNNNNN.pt"
                       " files, or --resume auto for the latest")
    if not path.is_file():
        have = ", ".join(p.name for _, p in checkpoint_paths(run_dir)) or "none"
        raise RunError(f"--resume {value}: no such checkpoint (--out {run_dir} has: {have})")
    return path


BEST_CHECKPOINT = "best.pt"  # cluster.select: best_unsupervised
BEST_FILE = "best.json"  # the step and criterion of the best evaluation so far (read back on resume)
RUN_FILES = ("log.jsonl", "metrics.json", "encoder.pt", BEST_CHECKPOINT, BEST_FILE)


def start_fresh(run_dir: Path, overwrite: bool = False) -> None:
    """A new run must not mix with an old one: refuse a folder with checkpoints unless told to overwrite."""
    old = checkpoint_paths(run_dir)
    if old and not overwrite:
        raise RunError(
            f"--out {run_dir}: holds checkpoints of an earlier run ({old[-1][1].name});"
            " add --resume to continue it or pick a new --out"
        )
    for _, path in old:
        _remove_with_checksum(path)
    for name in RUN_FILES:
        _remove_with_checksum(Path(run_dir) / name)


def restore_latest(
    run_dir: Path, components: dict, identity_key: str, identity: dict, chosen: str | Path | None = None
) -> dict | None:
    """Load the newest good checkpoint into ``components`` (name -> object with load_state_dict).

    ``chosen`` (``--resume PATH``): that checkpoint of ``run_dir`` instead; once it is known to fit,
    the newer ones are renamed to ``*.pt.abandoned``, so the run continues from it alone.
    Returns the checkpoint (for its step and other plain values), or None when there is none.
    """
    if chosen is not None:
        path = chosen_checkpoint(run_dir, chosen)
        found = safe_torch_load(path), path
    else:
        found = latest_checkpoint(run_dir)
    if found is None:
        print(f"mcscale: no checkpoint in {run_dir}; starting from the beginning")
        return None
    state, path = found
    check_compatible(state[identity_key], identity, path)
    for name, component in components.items():
        component.load_state_dict(state[name])
    if chosen is not None:
        number = int(CHECKPOINT_PATTERN.match(path.name).group(1))
        for later, newer in checkpoint_paths(run_dir):
            if later > number:
                aside = _set_aside(newer, ".abandoned")
                print(f"mcscale: setting aside {newer.name} (renamed to {aside.name}): newer than {path.name}")
    print(f"mcscale: resumed from {path.name} at step {state['step']}")
    return state


def check_compatible(saved: dict, expected: dict, path: Path) -> None:
    for key, value in expected.items():
        if key in saved and saved[key] != value:
            raise RunError(
                f"{path}: checkpoint has {key}={saved[key]!r} but this run has {key}={value!r};"
                " use a fresh --out folder or the original config"
            )


# ---------------------------------------------------------------- one writer per run folder
LOCK_FILE = ".mcscale.lock"


_HELD_LOCKS: dict[str, object] = {}  # resolved run folder -> the open lock file of this process


def lock_run_folder(out: Path) -> None:
    """Hold an exclusive OS lock (flock) on ``out`` for the run's life, or refuse with one line naming
    the holder. The OS drops it when the process ends, however it ends: a crash leaves no stale lock."""
    import fcntl

    key = str(Path(out).resolve())
    handle = open(Path(out) / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(f"--out {out}: in use by {holder}; wait for that run to end, or pick another --out") from None
    _HELD_LOCKS[key] = handle


def _sign_lock(out: Path) -> None:
    """Write who holds the lock into it (once the run is accepted: a refused run changes no file)."""
    handle = _HELD_LOCKS[str(Path(out).resolve())]
    command = " ".join(["mcscale"] + sys.argv[1:])[:160]
    handle.seek(0)
    handle.truncate()
    handle.write(f"`{command}` (pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()


def unlock_run_folder(out: Path) -> None:
    """Release this process's lock on ``out`` (a no-op where it holds none, e.g. on ranks other than 0).
    The holder line is cleared first, so a run that ends (or is refused) leaves the lock file as it found
    it: empty. Only a process that dies holding the lock leaves its line, for the next holder to replace."""
    handle = _HELD_LOCKS.pop(str(Path(out).resolve()), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()
        handle.close()


# ---------------------------------------------------------------- several ranks
def open_run_folder(par, out_dir, resume: bool, overwrite: bool = False) -> Path:
    """The run folder, locked for this run and checked (and emptied of an old run unless resuming) by
    rank 0 alone; the lock comes first, so a second writer never touches the first one's files.
    Pair with ``unlock_run_folder``."""
    def prepare():
        out = prepare_out_dir(out_dir)
        lock_run_folder(out)
        try:
            if not resume:
                start_fresh(out, overwrite)
            _sign_lock(out)
        except BaseException:
            unlock_run_folder(out)
            raise
        return str(out)

    return Path(par.on_main(prepare))


def restore_on_all_ranks(par, run_dir: Path, components: dict, identity_key: str, identity: dict,
                         chosen=None, sharded: bool = False) -> dict | None:
    """``restore_latest`` on rank 0 (which may set broken checkpoints aside); every other rank then
    loads the very checkpoint rank 0 settled on, so all ranks hold the same state. The checkpoint's
    world size is then checked against this run's (``check_world_size``; ``sharded``: a shard loader)."""
    restored = {}

    def choose():
        restored["state"] = restore_latest(run_dir, components, identity_key, identity, chosen)
        return None if restored["state"] is None else restored["state"]["step"]

    step = par.on_main(choose)
    if step is None:
        return None
    state = restored.get("state")
    if state is None:  # another rank than 0
        state = safe_torch_load(Path(run_dir) / f"ckpt-{step:07d}.pt")
        for name, component in components.items():
            component.load_state_dict(state[name])
    check_world_size(state, par.world_size, sharded, run_dir)
    return state


def save_on_main(par, run_dir: Path, step: int, state: dict) -> None:
    """``save_checkpoint`` on rank 0 (every rank holds the same state); no rank moves on, or exits,
    before the checkpoint exists."""
    if par.is_main:
        save_checkpoint(run_dir, step, {**state, "world_size": par.world_size})
    par.barrier()


def check_world_size(state: dict, world_size: int, sharded: bool, path_hint: Path) -> None:
    """A checkpoint holds global state only (batches are functions of the step, statistics are
    global), so the tensor loader resumes on any number of ranks, equal up to float rounding. The
    sharded loaders' position depends on the rank split: they must resume on the same world size."""
    saved = state.get("world_size", 1)
    if saved == world_size:
        return
    if sharded:
        raise RunError(f"{path_hint}: written by {saved} rank(s), resumed on {world_size}; a sharded loader "
                       f"(data.loader) splits data by rank: launch with {saved} processes")
    print(f"mcscale: checkpoint written by {saved} rank(s), resuming on {world_size}: same batches, numbers "
          "equal up to float rounding")


def load_weights(module: torch.nn.Module, weights: dict, path: Path) -> None:
    """``module.load_state_dict`` with a one-line error naming the file when the shapes or names
    differ (a checkpoint of another architecture, or of an older mcscale)."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise RunError(f"{path}: its weights do not fit this model ({detail[:200]}); "
                       "it was written by another architecture or mcscale version: train again") from None


ENCODER_FILE = "encoder.pt"


def load_encoder(encoder_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The encoder saved by `mcscale pretrain` (weights only, never unpickled objects)."""
    from mcscale.files import safe_torch_load

    path = Path(encoder_dir) / ENCODER_FILE if Path(encoder_dir).is_dir() else Path(encoder_dir)
    if not path.is_file():
        raise RunError(f"--encoder {encoder_dir}: no {ENCODER_FILE} there; run `mcscale pretrain --out {encoder_dir}` first")
    saved = safe_torch_load(path)
    arch = saved["architecture"]
    encoder = build_byol(arch).encoder()
    load_weights(encoder, saved["encoder"], path)
    return encoder.to(device), arch


REPORT_DIR = "report"


PREDICTIONS_FILE = "predictions.npz"


PREDICTION_ARRAYS = ("labels", "pred_target", "pred_aux", "features")


# ---------------------------------------------------------------- reading a run
def load_run(run_dir) -> dict:
    """A clustering run's raw config (without its ``run:`` block), that block, metrics and the records
    of log.jsonl."""
    run_dir = Path(run_dir)
    config, run = read_run_yaml(run_dir, "`mcscale cluster`")
    if run.get("stage") != "cluster":
        raise RunError(f"--run {run_dir}: not a clustering run (config.yaml says stage {run.get('stage')!r})")
    log_path = run_dir / "log.jsonl"
    records = read_jsonl(log_path) if log_path.is_file() else []
    return {"dir": run_dir, "config": config, "run": run, "metrics": read_metrics(run_dir), "records": records}


# ---------------------------------------------------------------- predictions
def prediction_arrays(preds: dict, labels) -> dict[str, np.ndarray]:
    """The arrays of predictions.npz from ``evaluate.predict``'s output and the true labels."""
    return {
        "labels": np.asarray(labels, dtype=np.int64),
        "pred_target": preds["target"].numpy().astype(np.int64),
        "pred_aux": preds["aux"].numpy().astype(np.int64),
        "features": preds["features"].float().numpy().astype(np.float32),
    }


def save_predictions(run_dir, predictions: dict, step: int | None = None) -> Path:
    """np.savez of plain arrays (loads with allow_pickle=False); ``step`` tells a stale file apart."""
    path = Path(run_dir) / REPORT_DIR / PREDICTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(predictions[name]) for name in PREDICTION_ARRAYS}
    arrays["features"] = arrays["features"].astype(np.float32)
    arrays["step"] = np.asarray(-1 if step is None else step, dtype=np.int64)
    tmp = path.with_name(f".{path.name}.tmp.npz")  # np.savez appends .npz to names without it
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def load_predictions(run_dir) -> dict[str, np.ndarray] | None:
    path = Path(run_dir) / REPORT_DIR / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
