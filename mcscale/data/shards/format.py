"""The on-disk shard format written by `mcscale prepare` and read by the sharded loaders.

A prepared folder holds:
- ``shard-NNNNNN.tar``: WebDataset tars (USTAR, deterministic headers). Each sample is three members
  ``KEY.png`` or ``KEY.jpg`` (the encoded image), ``KEY.cls`` (ASCII class id) and ``KEY.idx`` (ASCII
  index of the sample in the long-tailed subset); KEY is the index as ``%09d``.
- ``shard-NNNNNN.idx``: the DALI index of each tar (wds2idx format ``v1.2``, see ``index_text``).
- ``labels.npy``: the subset's int64 labels in index order (evaluation needs them without a full read).
- ``manifest.json``: counts, checksums and how the folder was made (written last, atomically).
- ``.sha256-cache.json``: written by the loaders, not by prepare: which shards already matched their
  manifest SHA-256 (mcscale.data.shards.verify).

A loader checks each shard's size (``load_manifest``) and SHA-256 (mcscale.data.shards.verify) when it is
built, so a missing, truncated or same-size corrupt shard is refused before any batch is read.

Samples are written in a fixed pseudo-random order (``write_order`` in the manifest), so any
contiguous range of the concatenated shards is a class-mixed random subset: ranks and workers split
the data into contiguous ranges, which would otherwise give a sorted dataset's head classes to rank 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mcscale.data.sources import DataError
from mcscale.files import atomic_write_bytes, sha256_of

FORMAT = "mcscale-shards/1"
MANIFEST = "manifest.json"
LABELS = "labels.npy"
IMAGE_EXTS = ("png", "jpg")
INDEX_VERSION = "v1.2"  # the wds2idx format DALI 1.x/2.x reads: "<ext> <offset> <size> <name>" per member


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def index_name(i: int) -> str:
    return f"shard-{i:06d}.idx"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# written under a temporary name and renamed (see mcscale.runtime)
atomic_write = atomic_write_bytes
# one file hasher for the project (prepare, the DALI error path, the loaders' check)
sha256_file = sha256_of


# ---------------------------------------------------------------- tar writing / reading
def tar_bytes(samples) -> bytes:
    """A USTAR archive of ``samples`` = [(key, [(ext, bytes), ...]), ...], members in the given order.

    Headers carry no time, owner or mode information, so the same samples always give the same bytes
    (a rerun of prepare reproduces identical checksums). USTAR headers are exactly one 512-byte block,
    which keeps the data offsets DALI's index needs simple.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_members(data: bytes, where: str) -> list[tuple[str, str, int, int]]:
    """(key, ext, data_offset, size) of every regular member, in archive order; DataError if unreadable."""
    members = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, dot, ext = m.name.partition(".")
                if not dot or "/" in m.name:
                    raise DataError(f"{where}: unexpected member {m.name!r}")
                if m.offset_data + m.size > len(data):
                    raise tarfile.ReadError("unexpected end of data")
                members.append((key, ext, m.offset_data, m.size))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{where}: not a readable tar ({err})") from None
    return members


def group_samples(members, where: str) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Members grouped into samples by key (consecutive members with the same key, as DALI groups)."""
    samples: list[tuple[str, list]] = []
    seen = set()
    for key, ext, offset, size in members:
        if not samples or samples[-1][0] != key:
            if key in seen:
                raise DataError(f"{where}: sample {key} is split across the archive")
            seen.add(key)
            samples.append((key, []))
        samples[-1][1].append((ext, offset, size))
    return samples


def index_text(samples, tar_name: str | None = None) -> str:
    """DALI's wds2idx index: ``v1.2 <num_samples>`` then one line per sample listing, per member,
    ``<ext> <data offset> <size> <member name>`` (offsets are multiples of 512: tar blocks)."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, fields in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {key}.{ext}" for ext, offset, size in fields))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- manifest
@dataclass
class ShardInfo:
    path: Path
    index_path: Path
    num_samples: int
    start: int  # position of the shard's first sample in the concatenated, ordered list
    bytes: int
    sha256: str
    index_sha256: str | None = None


@dataclass
class Manifest:
    root: Path
    data: dict
    shards: list[ShardInfo]

    @property
    def num_samples(self) -> int:
        return int(self.data["num_samples"])

    @property
    def num_classes(self) -> int:
        return int(self.data["num_classes"])

    @property
    def channels(self) -> int:
        return int(self.data["image_shape"][2])

    @property
    def image_shape(self) -> list:
        return list(self.data["image_shape"])

    @property
    def mean(self) -> list[float]:
        return list(self.data["pixel_mean"])

    @property
    def std(self) -> list[float]:
        return list(self.data["pixel_std"])

    def prepare_hint(self) -> str:
        """The command that (re)writes this folder; prepare rewrites only missing or bad shards."""
        if not self.data.get("prepare_args"):
            return f"write {self.root} again (it was written from arrays by write_arrays)"
        args = " ".join(self.data["prepare_args"])
        return f"re-run `mcscale prepare {args} --out {self.root}` (it rewrites only missing or bad shards)"

    def labels(self):
        import numpy as np

        path = self.root / LABELS
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable ({type(err).__name__}); {self.prepare_hint()}") from None


def load_manifest(folder, check_files: bool = True, need_index: bool = False) -> Manifest:
    """Read ``folder/manifest.json``; with ``check_files``, also check every shard is present with its
    recorded size (a cheap stat that catches missing and truncated shards before any worker starts),
    and with ``need_index`` that every DALI index file is present and names the right sample count.
    The SHA-256 check (same-size corruption) is mcscale.data.shards.verify's, which the loaders run next."""
    root = Path(folder).expanduser()
    path = root / MANIFEST if root.is_dir() or not root.name.endswith(".json") else root
    root = path.parent
    if not path.is_file():
        raise DataError(f"{path}: no manifest; write the shards with `mcscale prepare --source NAME --out {root}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest ({type(err).__name__}); re-run `mcscale prepare` "
                        f"with --out {root}") from None
    if data.get("format") != FORMAT:
        raise DataError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}; re-run `mcscale prepare` "
                        f"into a new folder")
    shards, start = [], 0
    for entry in data["shards"]:
        shards.append(ShardInfo(root / entry["path"], root / entry["index"], int(entry["num_samples"]), start,
                                int(entry["bytes"]), entry["sha256"], entry.get("index_sha256")))
        start += int(entry["num_samples"])
    manifest = Manifest(root, data, shards)
    if start != manifest.num_samples:
        raise DataError(f"{path}: shards hold {start} samples but num_samples is {manifest.num_samples}; "
                        f"{manifest.prepare_hint()}")
    if check_files:
        check_shards(manifest, need_index)
    return manifest


def check_shards(manifest: Manifest, need_index: bool) -> None:
    for shard in manifest.shards:
        if not shard.path.is_file():
            raise DataError(f"{shard.path}: shard missing; {manifest.prepare_hint()}")
        size = shard.path.stat().st_size
        if size != shard.bytes:
            raise DataError(f"{shard.path}: {size} bytes but the manifest says {shard.bytes} (truncated or "
                            f"corrupt shard); {manifest.prepare_hint()}")
        if need_index:
            check_index(manifest, shard)


def check_index(manifest: Manifest, shard: ShardInfo) -> None:
    if not shard.index_path.is_file():
        raise DataError(f"{shard.index_path}: DALI index of {shard.path.name} missing; {manifest.prepare_hint()}")
    with open(shard.index_path) as f:
        head = f.readline().split()
    if len(head) != 2 or head[0] != INDEX_VERSION or head[1] != str(shard.num_samples):
        raise DataError(f"{shard.index_path}: header {' '.join(head)!r}, expected '{INDEX_VERSION} "
                        f"{shard.num_samples}' (stale or corrupt index); {manifest.prepare_hint()}")
