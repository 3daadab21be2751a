"""Files written so that a kill never leaves them half-written, their sha256 sidecars, the
weights-only checkpoint loader, and the append-only JSON-lines log.

torch is imported inside the functions that use it: the command line imports this module (through
the shard tools) while it checks a run's configuration, before any heavy import."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mcscale.errors import RunError

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------- files
def _default_mode() -> int:
    """0666 & ~umask: what open() would give (mkstemp's 0600 would hide results from other users)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_target(path: Path):
    """Yield a temporary path beside ``path``; on success it is fsynced, given the usual file mode and
    renamed over ``path``, so a kill never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _atomic_target(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, obj, checksum: bool = False) -> None:
    """torch.save, atomically; with ``checksum`` also a ``sha256sum -c`` sidecar (see write_checksum)."""
    if checksum:  # a kill between the two writes must not leave the old sidecar beside the new file
        checksum_path(path).unlink(missing_ok=True)
    import torch

    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)
    if checksum:
        write_checksum(path)


# ---------------------------------------------------------------- checksums
def checksum_path(path: Path) -> Path:
    """``ckpt-0000040.pt`` -> ``ckpt-0000040.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: Path) -> None:
    """Write ``path``'s size and sha256 beside it (atomically), in the format of ``sha256sum``; the size
    is on a comment line, which ``sha256sum -c`` skips."""
    path = Path(path)
    text = f"# size {path.stat().st_size}\n{sha256_of(path)}  {path.name}\n"
    atomic_write_bytes(checksum_path(path), text.encode())


def verify_checksum(path: Path) -> None:
    """Raise RunError when ``path`` does not match its sidecar; a file without one (older runs) passes."""
    path = Path(path)
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return
    size, digest = None, None
    for line in sidecar.read_text(errors="replace").splitlines():
        if line.startswith("# size "):
            size = line[len("# size "):].strip()
        elif line.strip() and not line.startswith("#"):
            digest = line.split()[0].lower()
    if digest is None or size is None or not size.isdigit():
        raise RunError(f"{sidecar}: not a checksum file of {path.name}; delete it to load the file unchecked")
    actual_size = path.stat().st_size
    if actual_size != int(size):
        raise RunError(f"{path}: {actual_size} bytes, but {sidecar.name} says {size} (truncated or overwritten);"
                       " delete it or resume from an older one")
    actual = sha256_of(path)
    if actual != digest:
        raise RunError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., {sidecar.name} says {digest[:12]}...);"
                       " the file is corrupt: delete it or resume from an older one")


def write_csv(path, fieldnames, rows: list[dict]) -> None:
    """A benchmark's rows as CSV (atomically, folders created)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(Path(path), buffer.getvalue().encode())


def pickle_refusal(err: pickle.UnpicklingError) -> str:
    """What a weights-only load refused, from torch's message: the first Python object it names."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f"it refers to the Python object {found.group(1)}" if found else "it holds Python objects"


def safe_torch_load(path: Path, map_location="cpu"):
    """Load a checkpoint without running code from it (weights_only), after checking it against its
    sha256 sidecar when there is one; refuse anything else clearly."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: checkpoint not found")
    verify_checksum(path)
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise RunError(f"{path}: refused to load: {pickle_refusal(err)}, and a checkpoint must hold only tensors and plain "
                       "values (loading it could run code); use a checkpoint written by mcscale") from None
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
