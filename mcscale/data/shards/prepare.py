"""`mcscale prepare`: write the long-tailed subset of a source as WebDataset shards + DALI indexes.

Restartable: each shard is written under a temporary name, checked, and renamed; a progress file
records the checksum of every finished shard, so a rerun (after a kill, or after a shard was deleted
or damaged) keeps every shard that still matches its checksum and rewrites only the others. The
manifest is written last, atomically, after every shard was re-read and counted.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from mcscale.data.sources import DataError
from mcscale.progress import progress
from mcscale.data.shards import format as fmt
from mcscale.data.shards.samples import Plan, encode_array, plan
from mcscale.data.shards.verify import CACHE as CHECKSUM_CACHE

PROGRESS = ".prepare-progress.json"
DEFAULT_SHARD_SIZE = 1000
ORDER_SEED = 0
# Our temporary files (format.atomic_write names them ".<final name>.<random>.tmp").
# The loaders' checksum cache (mcscale.data.shards.verify) is written the same way.
_TEMP_PREFIXES = (".shard-", f".{fmt.MANIFEST}.", f".{fmt.LABELS}.", f".{PROGRESS}.", f".{CHECKSUM_CACHE}.")


def prepare(source: str, root: str | None, imbalance_ratio: float | None, n_max: int | None, shard_size: int,
            out_dir, labels_file: str | None = None, image_size: int | None = None, split: str = "train",
            show_progress: bool = True) -> dict:
    """Write ``out_dir`` (see mcscale.data.shards.format) and return the manifest.

    imbalance_ratio None keeps every sample. image_size applies to image-file sources only (resize to
    image_size x image_size and re-encode, as load_source's load size); in-memory sources are stored
    at their own resolution, and image files by default as they are.
    """
    _check_shard_size(shard_size)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"--image-size: must be a positive integer, got {image_size!r}")
    out = Path(out_dir).expanduser()
    params = {
        "format": fmt.FORMAT, "source": source, "root": None if root is None else str(root),
        "labels_file": None if labels_file is None else str(labels_file), "split": split,
        "imbalance_ratio": None if imbalance_ratio is None else float(imbalance_ratio), "n_max": n_max,
        "shard_size": shard_size, "image_size": image_size, "order_seed": ORDER_SEED,
    }
    return _write(plan(source, root, imbalance_ratio, n_max, labels_file, image_size, split), out, params,
                  show_progress)


def write_arrays(images, labels, out_dir, shard_size: int, num_classes: int | None = None,
                 show_progress: bool = False) -> dict:
    """A prepared folder from in-memory uint8 (N, H, W, C) images and labels, all kept, PNG-encoded
    (tests, benchmarks, data made in Python). Restartable like `prepare`."""
    images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) != len(labels) or not len(labels):
        raise DataError(f"write_arrays: need uint8 (N, H, W, 1 or 3) images and N labels, got "
                        f"{images.shape} and {labels.shape}")
    k = int(num_classes or labels.max() + 1)
    params = {"format": fmt.FORMAT, "source": "arrays", "shard_size": shard_size, "order_seed": ORDER_SEED,
              "num_samples": len(labels), "image_shape": list(images.shape[1:]),
              "images_sha256": fmt.sha256_bytes(images.tobytes()), "labels_sha256": fmt.sha256_bytes(labels.tobytes())}
    p = Plan("arrays", labels, np.bincount(labels, minlength=k).tolist(), k, [str(i) for i in range(k)], None,
             lambda i: encode_array(images[i]))
    return _write(p, Path(out_dir).expanduser(), params, show_progress)


def _check_shard_size(shard_size) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size: must be a positive integer, got {shard_size!r}")


def _write(p: Plan, out: Path, params: dict, show_progress: bool) -> dict:
    _check_shard_size(params["shard_size"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out}: cannot create it ({err.strerror}); pick a writable folder") from None
    known = _previous_shards(out, params)
    _remove_stale_temps(out)

    # A fixed permutation: every contiguous range of shards is a class-mixed sample (format.py).
    order = np.random.default_rng(ORDER_SEED).permutation(len(p.labels))
    size = params["shard_size"]
    groups = [order[s:s + size] for s in range(0, len(order), size)]
    done: dict[str, dict] = {}
    bar = progress(total=len(groups), desc="prepare", unit="shard", disable=not show_progress or None)
    for i, group in enumerate(groups):
        entry = known.get(str(i))
        if entry is None or not _reusable(out, i, entry, group):
            entry = _write_shard(out, i, group, p)
        done[str(i)] = entry
        _write_json(out / PROGRESS, {"params": params, "shards": done})
        bar.update(1)
    bar.close()
    _remove_extra_shards(out, len(groups))

    # Re-read every shard from disk before the manifest vouches for it.
    for i, group in enumerate(groups):
        verify_shard(out / fmt.shard_name(i), out / fmt.index_name(i), [fmt.sample_key(int(k)) for k in group],
                     done[str(i)]["sha256"])
    labels = _npy_bytes(p.labels.astype(np.int64))
    fmt.atomic_write(out / fmt.LABELS, labels)
    manifest = _manifest(params, p, [done[str(i)] for i in range(len(groups))], fmt.sha256_bytes(labels))
    _write_json(out / fmt.MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- one shard
def shard_samples(group, p: Plan) -> tuple[list, dict]:
    """The tar members of one shard and its pixel statistics (sums in float64 over [0, 1] values)."""
    samples, shapes, exts = [], set(), set()
    total = total_sq = None
    pixels = 0
    for index in group:
        index = int(index)
        enc = p.encode(index)
        fields = [(enc.ext, enc.data), ("cls", str(int(p.labels[index])).encode("ascii")),
                  ("idx", str(index).encode("ascii"))]
        samples.append((fmt.sample_key(index), fields))
        x = enc.pixels.reshape(-1, enc.pixels.shape[-1]).astype(np.float64) / 255.0
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
        pixels += x.shape[0]
        shapes.add(tuple(int(s) for s in enc.shape))
        exts.add(enc.ext)
    stats = {"pixels": pixels, "sum": total.tolist(), "sum_sq": total_sq.tolist(),
             "shape": list(shapes.pop()) if len(shapes) == 1 else None, "exts": sorted(exts)}
    return samples, stats


def _write_shard(out: Path, i: int, group, p: Plan) -> dict:
    samples, stats = shard_samples(group, p)
    data = fmt.tar_bytes(samples)
    name, index = fmt.shard_name(i), fmt.index_name(i)
    members = fmt.group_samples(fmt.read_members(data, name), name)  # what DALI will see
    index_text = fmt.index_text(members).encode("ascii")
    # The index first: a kill between the two renames leaves an index without its tar, which a
    # rerun rewrites; a tar is never under its final name without its index.
    fmt.atomic_write(out / index, index_text)
    fmt.atomic_write(out / name, data)
    return {"path": name, "num_samples": len(samples), "bytes": len(data), "sha256": fmt.sha256_bytes(data),
            "index": index, "index_sha256": fmt.sha256_bytes(index_text), "stats": stats}


def _reusable(out: Path, i: int, entry: dict, group) -> bool:
    """A finished shard from an earlier run is kept when its bytes match the recorded checksum; a
    missing or stale index is rebuilt from the tar alone."""
    path = out / fmt.shard_name(i)
    if entry.get("num_samples") != len(group) or not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    if fmt.sha256_file(path) != entry["sha256"]:
        return False
    index = out / fmt.index_name(i)
    if not index.is_file() or fmt.sha256_file(index) != entry["index_sha256"]:
        data = path.read_bytes()
        text = fmt.index_text(fmt.group_samples(fmt.read_members(data, path.name), path.name)).encode("ascii")
        if fmt.sha256_bytes(text) != entry["index_sha256"]:
            return False
        fmt.atomic_write(index, text)
    return True


def verify_shard(path: Path, index_path: Path, keys: list[str], sha256: str) -> None:
    """Re-read a shard: checksum, the exact sample keys in order, three fields each, and its index."""
    where = str(path)
    data = path.read_bytes()
    if fmt.sha256_bytes(data) != sha256:
        raise DataError(f"{where}: checksum changed while preparing; re-run `mcscale prepare`")
    samples = fmt.group_samples(fmt.read_members(data, where), where)
    found = [key for key, _ in samples]
    if found != keys:
        raise DataError(f"{where}: holds {len(found)} samples, expected {len(keys)}; re-run `mcscale prepare`")
    for key, fields in samples:
        exts = sorted(ext for ext, _, _ in fields)
        if len(exts) != 3 or "cls" not in exts or "idx" not in exts or not set(exts) & set(fmt.IMAGE_EXTS):
            raise DataError(f"{where}: sample {key} has fields {exts}; re-run `mcscale prepare`")
    if index_path.read_text() != fmt.index_text(samples):
        raise DataError(f"{index_path}: does not match {path.name}; re-run `mcscale prepare`")


# ---------------------------------------------------------------- bookkeeping
def _previous_shards(out: Path, params: dict) -> dict:
    """Finished shards recorded by an earlier run with the same parameters."""
    path = out / PROGRESS
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable (it is written atomically, so hand-edited): redo everything, safely
    if state.get("params") != params:
        old = state.get("params") or {}
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v)
        raise DataError(f"--out {out}: holds shards of a different prepare ({diff}); use an empty folder "
                        "or delete this one")
    return dict(state.get("shards") or {})


def _remove_stale_temps(out: Path) -> None:
    """Temporary files of a killed run (never under a final name, so never mistaken for a shard)."""
    for path in out.iterdir():
        if path.name.endswith(".tmp") and path.name.startswith(_TEMP_PREFIXES) and path.is_file():
            path.unlink()


def _remove_extra_shards(out: Path, count: int) -> None:
    # Left by an earlier run of the same parameters on a source that has since shrunk.
    i = count
    while (out / fmt.shard_name(i)).exists() or (out / fmt.index_name(i)).exists():
        (out / fmt.shard_name(i)).unlink(missing_ok=True)
        (out / fmt.index_name(i)).unlink(missing_ok=True)
        i += 1


def _write_json(path: Path, obj) -> None:
    fmt.atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _prepare_args(params: dict) -> list[str]:
    args = ["--source", params["source"]]
    for key, flag in (("root", "--root"), ("labels_file", "--labels-file")):
        if params[key] is not None:
            args += [flag, params[key]]
    if params["split"] != "train":
        args += ["--split", params["split"]]
    ratio = params["imbalance_ratio"]
    args += ["--imbalance-ratio", "none" if ratio is None else f"{ratio:g}"]
    if params["n_max"] is not None:
        args += ["--n-max", str(params["n_max"])]
    args += ["--shard-size", str(params["shard_size"])]
    if params["image_size"] is not None:
        args += ["--image-size", str(params["image_size"])]
    return args


def _manifest(params: dict, p: Plan, entries: list[dict], labels_sha: str) -> dict:
    pixels = sum(e["stats"]["pixels"] for e in entries)
    total = np.sum([e["stats"]["sum"] for e in entries], axis=0)
    total_sq = np.sum([e["stats"]["sum_sq"] for e in entries], axis=0)
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq - pixels * mean**2, 0.0) / max(pixels - 1, 1))
    shapes = {tuple(e["stats"]["shape"]) if e["stats"]["shape"] else None for e in entries}
    channels = len(mean)
    shape = list(shapes.pop()) if len(shapes) == 1 and None not in shapes else [None, None, channels]
    exts = sorted({ext for e in entries for ext in e["stats"]["exts"]})
    return {
        "format": fmt.FORMAT,
        "source": p.source,
        "split": params.get("split"),
        "imbalance_ratio": params.get("imbalance_ratio"),
        "n_max": p.n_max,
        "num_samples": int(len(p.labels)),
        "num_classes": int(p.num_classes),
        "class_counts": [int(c) for c in p.counts],
        "class_names": list(p.class_names),
        "image_shape": shape,
        "encoding": exts,
        "pixel_mean": [float(v) for v in mean],
        "pixel_std": [float(max(v, 1e-6)) for v in std],
        "write_order": {"permuted": True, "seed": ORDER_SEED},
        "shard_size": params["shard_size"],
        "shards": [{k: e[k] for k in ("path", "num_samples", "bytes", "sha256", "index", "index_sha256")}
                   for e in entries],
        "labels": {"path": fmt.LABELS, "sha256": labels_sha},
        "prepare_args": _prepare_args(params) if p.source != "arrays" else None,
    }


# ---------------------------------------------------------------- command line
def _ratio(text: str):
    if text.lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'none', got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prepare", help="write the long-tailed subset as WebDataset shards + DALI indexes",
                              description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="digits, mnist, cifar10, cifar20, cifar100, stl10, "
                   "imagefolder or imagelist")
    p.add_argument("--root", help="the source's data folder (data.root)")
    p.add_argument("--labels-file", help="imagelist: the 'path label' list (data.labels_file)")
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("--imbalance-ratio", type=_ratio, default=10.0,
                   help="r of METHOD section 1 (default 10); 'none' keeps every sample")
    p.add_argument("--n-max", type=int, help="head-class size (default: the smallest class size)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, help="image-file sources: resize to NxN and re-encode "
                   "(default: keep the files as they are)")
    p.add_argument("--out", required=True, help="folder for the shards and manifest.json")
    return p


def run(args) -> int:
    manifest = prepare(args.source, args.root, args.imbalance_ratio, args.n_max, args.shard_size, args.out,
                       labels_file=args.labels_file, image_size=args.image_size, split=args.split)
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards written to "
          f"{Path(args.out) / fmt.MANIFEST} (class counts {manifest['class_counts']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcscale")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["prepare", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except DataError as err:
        print(f"mcscale: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
