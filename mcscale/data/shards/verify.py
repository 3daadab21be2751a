"""The SHA-256 check of a prepared folder against its manifest, run when a sharded loader is built.

``load_manifest`` only compares sizes (a stat); a shard with the right size but other bytes (a flipped
bit, a bad copy) would otherwise be found only if decoding happened to fail, and a damaged label or
index field decodes fine. So every loader hashes each shard (and, for DALI, each index file) with
mcscale.files.sha256_of and refuses a mismatch with one line naming the file and the `mcscale
prepare` command to rerun (which rewrites exactly the bad shards).

Cache: hashing a large set on every run is slow, so a file that matched the manifest is remembered by
(resolved path, size, mtime_ns): for the rest of the process, and on disk in ``.sha256-cache.json``
next to ``manifest.json`` (written atomically). When that folder is not writable the cache goes to
``$XDG_CACHE_HOME/mcscale/shard-sha256/`` (``~/.cache`` by default); when neither is writable it is
skipped -- never an error. Only hashes that matched are cached, and only for files whose mtime was at
least ``RACY_NS`` old when they were hashed: a later write within the same filesystem timestamp tick
would leave the mtime unchanged. A change that keeps both size and mtime (``touch -d`` back to the old
time) is not noticed; delete the cache file to force a full check.

Ranks: every rank checks every shard when its loader is built (training ranges rotate, so each rank
reads every shard within W epochs). The files are the same for all ranks, so a bad one stops every rank
with the same line at the same point, before any collective; concurrent cache writes are atomic and
complete, the last one wins.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mcscale import files as file_io
from mcscale.data.sources import DataError
from mcscale.progress import progress
from mcscale.data.shards import format as fmt

CACHE = ".sha256-cache.json"
CACHE_FORMAT = "mcscale-sha256-cache/1"
RACY_NS = 2 * 10**9  # FAT's 2 s mtime granularity; ext4 / XFS / NFS are finer
PROGRESS_BYTES = 1 << 30  # a progress bar (rank 0) only when there is this much to hash

# (resolved path, size, mtime_ns, sha256) of files this process has already checked
_verified: set[tuple[str, int, int, str]] = set()


def verify_checksums(manifest: fmt.Manifest, need_index: bool = False, show_progress: bool = False) -> int:
    """Check every shard (and with ``need_index`` every DALI index) against the manifest's SHA-256;
    DataError naming the first bad file. Returns how many files were hashed (the rest came from the
    caches). Missing and wrong-size files are load_manifest's to report (it runs first)."""
    files = [(s.path, s.sha256, None) for s in manifest.shards]
    if need_index:
        files += [(s.index_path, s.index_sha256, s.path.name) for s in manifest.shards if s.index_sha256]
    known = {str(p.resolve()) for s in manifest.shards for p in (s.path, s.index_path)}
    locations = cache_locations(manifest.root)
    cached = _read_cache(locations)
    on_disk = dict(cached)
    todo = []
    for path, expected, index_of in files:
        key, st = str(path.resolve()), _stat(manifest, path)
        if (key, st.st_size, st.st_mtime_ns, expected) in _verified or cached.get(key) == _entry(st, expected):
            _verified.add((key, st.st_size, st.st_mtime_ns, expected))
            cached[key] = _entry(st, expected)
        else:
            cached.pop(key, None)  # an entry of an older version of the file
            todo.append((path, expected, index_of, key, st))
    total = sum(t[4].st_size for t in todo)
    bar = progress(total=total, desc="verify shards", unit="B", unit_scale=True,
                   disable=not (todo and show_progress and total >= PROGRESS_BYTES) or None)
    try:
        for path, expected, index_of, key, st in todo:
            started = time.time_ns()
            try:
                actual = file_io.sha256_of(path)
                after = os.stat(path)
            except OSError as err:
                raise DataError(f"{path}: unreadable ({err.strerror or type(err).__name__}); "
                                f"{manifest.prepare_hint()}") from None
            if actual != expected:
                what = f"stale or corrupt DALI index of {index_of}" if index_of else "corrupt shard"
                raise DataError(f"{path}: checksum mismatch (sha256 {actual[:12]}..., the manifest says "
                                f"{expected[:12]}...): {what}; {manifest.prepare_hint()}")
            bar.update(st.st_size)
            unchanged = (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
            if unchanged and started - st.st_mtime_ns >= RACY_NS:
                _verified.add((key, st.st_size, st.st_mtime_ns, expected))
                cached[key] = _entry(st, expected)
    finally:  # what was verified before a mismatch is kept: a rerun after the fix hashes only the rest
        bar.close()
        current = {k: v for k, v in cached.items() if k in known}
        if current != {k: v for k, v in on_disk.items() if k in known}:
            _write_cache(locations, current)
    return len(todo)


def cache_locations(root: Path) -> list[Path]:
    """Where the on-disk cache of ``root`` may live: beside the manifest, else in the user's cache."""
    places = [Path(root) / CACHE]
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError):  # no home directory
        return places
    name = fmt.sha256_bytes(str(Path(root).resolve()).encode())[:16]
    return places + [base / "mcscale" / "shard-sha256" / f"{name}.json"]


def _entry(st: os.stat_result, sha256: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _stat(manifest: fmt.Manifest, path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or type(err).__name__}); "
                        f"{manifest.prepare_hint()}") from None


def _read_cache(locations: list[Path]) -> dict:
    """The entries of every readable cache file; an unreadable or foreign one counts as empty."""
    entries = {}
    for path in reversed(locations):  # the one beside the manifest wins
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == CACHE_FORMAT and isinstance(data.get("files"), dict):
            entries.update(data["files"])
    return entries


def _write_cache(locations: list[Path], files: dict) -> None:
    for path in locations:
        try:
            file_io.atomic_write_json(path, {"format": CACHE_FORMAT, "files": files})
            return
        except OSError:
            continue  # read-only folder: the next place, or no cache at all
