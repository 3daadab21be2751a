"""What `mcscale prepare` writes: the long-tailed subset of a source as encoded samples.

In-memory sources (digits, mnist, cifar*, stl10) are PNG-encoded losslessly (1-channel images as grey
PNG). Image-file sources (imagefolder, imagelist) keep their files' bytes when they already are RGB or
grey JPEG / PNG and no resize was asked for: a JPEG is never decoded and re-encoded for nothing. They
are listed in exactly the order `load_source` uses, so the subset (and every index) is the one the
in-memory ("tensor") loader trains on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mcscale.data.sources import (
    IMAGE_SUFFIXES,
    DataError,
    Source,
    _existing_root,
    _read_list,
    load_source,
    long_tail,
)

IN_MEMORY = ("digits", "mnist", "cifar10", "cifar20", "cifar100", "stl10")
FILES = ("imagefolder", "imagelist")
JPEG_QUALITY = 95  # only for a resized JPEG source; the originals are lossy already
STATS_SIZE = 64  # JPEGs are decoded at about this size (DCT scaling) just for the pixel statistics


@dataclass
class Encoded:
    ext: str  # "png" or "jpg"
    data: bytes
    pixels: np.ndarray  # uint8 (H, W, C) as decoded, for the statistics and the shape (maybe downscaled)
    shape: tuple[int, int, int]  # the stored image's (H, W, C)


@dataclass
class Plan:
    """The subset to write: labels in index order and an encoder for each subset index."""

    source: str
    labels: np.ndarray
    counts: list[int]
    num_classes: int
    class_names: list[str]
    n_max: int | None
    encode: Callable[[int], Encoded] = field(repr=False)


def plan(source: str, root: str | None, imbalance_ratio: float | None, n_max: int | None,
         labels_file: str | None = None, image_size: int | None = None, split: str = "train") -> Plan:
    if source in FILES:
        paths, labels, names = list_image_files(source, root, labels_file)
        keep, counts = subset_indices(source, labels, len(names), names, imbalance_ratio, n_max)
        kept = [paths[i] for i in keep]
        return Plan(source, labels[keep], counts, len(names), names, _n_max(counts, imbalance_ratio),
                    lambda i: encode_file(kept[i], image_size))
    if source not in IN_MEMORY:
        if source == "embeddings":
            raise DataError("--source embeddings: features are not images and need no shards; "
                            "train on them with data.loader=tensor")
        load_source(source)  # raises the usual one-line error for an unknown source
    if image_size is not None:
        raise DataError(f"--image-size: applies to image files (imagefolder, imagelist); {source} images are "
                        "stored at their own size (data.image_size sets the size of the views)")
    src = load_source(source, root, split=split, labels_file=labels_file)
    keep, counts = subset_indices(source, src.labels, src.num_classes, src.class_names, imbalance_ratio, n_max)
    images = src.images[keep]
    return Plan(source, src.labels[keep], counts, src.num_classes, list(src.class_names),
                _n_max(counts, imbalance_ratio), lambda i: encode_array(images[i]))


def _n_max(counts, ratio) -> int | None:
    return int(counts[0]) if ratio is not None and counts else None


def subset_indices(name, labels, num_classes, names, ratio, n_max) -> tuple[np.ndarray, list[int]]:
    """Indices kept by `long_tail` (METHOD.md section 1) and the class counts; ratio None keeps all.

    `long_tail` returns a Source, not indices: the row numbers ride along as a one-column feature
    matrix, so the selection (and its validation and messages) is exactly `long_tail`'s.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if ratio is None:
        if n_max is not None:
            raise DataError("--n-max: needs --imbalance-ratio (a ratio of none keeps every sample)")
        return np.arange(len(labels)), np.bincount(labels[labels >= 0], minlength=num_classes).tolist()
    rows = Source(name, labels, None, np.arange(len(labels), dtype=np.int64)[:, None], num_classes, list(names))
    subset, counts = long_tail(rows, ratio, n_max)
    return subset.features[:, 0].astype(np.int64), [int(c) for c in counts]


# ---------------------------------------------------------------- image files
def list_image_files(source: str, root, labels_file) -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths and labels in `load_source`'s order (imagefolder: classes then files sorted by name;
    imagelist: the list's order)."""
    if source == "imagefolder":
        folder = _existing_root(source, root)
        if not folder.is_dir():
            raise DataError(f"--root {folder}: not a folder; imagefolder expects one sub-folder of images per class")
        names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names:
            raise DataError(f"--root {folder}: no class sub-folders; imagefolder expects one per class")
        paths, labels = [], []
        for label, cls in enumerate(names):
            files = sorted(p for p in (folder / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise DataError(f"--root: class folder {folder / cls} has no images; add images or remove it")
            paths += files
            labels += [label] * len(files)
        return paths, np.asarray(labels, dtype=np.int64), names
    # imagelist: the same root / list resolution as load_source
    if labels_file is None:
        list_path = _existing_root(source, root)
        if not list_path.is_file():
            raise DataError(f"--labels-file: not set and --root {list_path} is not a list file")
        image_root = list_path.parent
    else:
        list_path = Path(labels_file).expanduser()
        if not list_path.is_file():
            raise DataError(f"--labels-file {list_path}: does not exist")
        image_root = list_path.parent if root is None else _existing_root(source, root)
        if image_root.is_file():
            image_root = image_root.parent
    rel, labels = _read_list(list_path)
    y = np.asarray(labels, dtype=np.int64)
    k = int(y.max()) + 1
    return [image_root / r for r in rel], y, [str(i) for i in range(k)]


def encode_file(path: Path, image_size: int | None) -> Encoded:
    """The file's own bytes when usable as they are, else a re-encode (RGB, optional resize)."""
    from PIL import Image

    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, (w, h) = img.format, img.mode, img.size
            usable = fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and image_size is None
            if usable:
                # Pixels only for statistics: JPEG draft decodes at a reduced scale, much faster.
                if fmt == "JPEG":
                    img.draft("RGB", (STATS_SIZE, STATS_SIZE))
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
                return Encoded("jpg" if fmt == "JPEG" else "png", data, pixels, (h, w, 3))
            rgb = img.convert("RGB")
            if image_size is not None:
                rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)  # as load_source
            pixels = np.asarray(rgb, dtype=np.uint8)
    except DataError:
        raise
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        raise DataError(f"{path}: cannot read this image ({type(err).__name__}: {err}); remove or replace it") from None
    ext = "jpg" if fmt == "JPEG" else "png"
    return Encoded(ext, _encode(pixels, ext), pixels, pixels.shape)


def encode_array(image: np.ndarray) -> Encoded:
    """Lossless PNG of a uint8 (H, W, C) image, C = 1 (grey PNG) or 3."""
    return Encoded("png", _encode(image, "png"), image, tuple(image.shape))


def _encode(image: np.ndarray, ext: str) -> bytes:
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    if ext == "png":
        pil.save(buf, format="PNG", compress_level=6)
    else:
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
