"""Dataset readers: load one source fully into memory, offline only (nothing is ever downloaded).

Every reader returns a `Source`: uint8 images (N, H, W, C) or float32 features (N, D), int64 labels
in dataset order (the order METHOD.md section 1 keeps "the first n_i samples" from).

Formats (`root` is `data.root`):
- digits: scikit-learn's bundled 8x8 digits (1797 images); `root` and `split` are ignored.
- mnist: the IDX files (gzip or not) in `root`. If split "train" is asked for and only the t10k
  files are there, the test files are used (with a warning), so the MNIST test set alone works.
- cifar10 / cifar100 / cifar20: the "python version" pickle batches; `root` is the batches folder or
  its parent. cifar20 is CIFAR-100 with the 20 coarse superclasses as labels. The pickles are read
  with a restricted unpickler that only builds numpy arrays (no arbitrary code can run).
- stl10: the binary files; split "train" is train + test merged (5000 + 8000 = 13000, METHOD.md).
- imagefolder: `root/<class>/**/<image>` (Tiny-ImageNet: `root` = its `train` folder); classes and
  files sorted by name.
- imagelist: an ImageNet-LT style list file of `relative/path label` lines (`labels_file`, or `root`
  itself when it is a file); paths are relative to `root` when it is a folder, else to the list's
  folder. File order is kept.
- embeddings: a .npy of features N x D (or a folder with features.npy and optional labels.npy);
  `labels_file` is an optional .npy of integer labels.
imagefolder / imagelist images are decoded with PIL to RGB and resized (bilinear, whole image, no
crop) to image_size x image_size, default 64: a 224 default would need 150 KB per image in memory.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcscale.data.longtail import default_n_max, long_tail_subset

log = logging.getLogger(__name__)

SOURCES = ("digits", "mnist", "cifar10", "cifar20", "cifar100", "stl10", "imagefolder", "imagelist",
           "embeddings")
SPLITS = ("train", "test")
DEFAULT_IMAGE_SIZE = 64
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# What each source expects at data.root and where to get it; only quoted in messages, never fetched.
_EXPECTS = {
    "mnist": "the IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-*; "
             "from https://yann.lecun.com/exdb/mnist/)",
    "cifar10": f"the python batches (cifar-10-batches-py/ from {_CIFAR_URL})",
    "cifar100": f"the python version (cifar-100-python/ from {_CIFAR_URL})",
    "cifar20": f"the CIFAR-100 python version (cifar-100-python/ from {_CIFAR_URL})",
    "stl10": "the binary files (stl10_binary/ from https://cs.stanford.edu/~acoates/stl10/)",
    "imagefolder": "a folder with one sub-folder of images per class (e.g. tiny-imagenet-200/train "
                   "from http://cs231n.stanford.edu/tiny-imagenet-200.zip)",
    "imagelist": "an image root folder and a list file of 'relative/path label' lines (e.g. "
                 "ImageNet_LT_train.txt from https://github.com/zhmiao/OpenLongTailRecognition-OLTR)",
    "embeddings": "a .npy file of float features N x D, or a folder with features.npy and optional "
                  "labels.npy",
}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class DataError(Exception):
    """A user-caused data problem; str(e) is ONE line naming the file/setting and the fix."""


@dataclass
class Source:
    name: str
    labels: np.ndarray  # int64 (N,), -1 where unknown
    images: np.ndarray | None  # uint8 (N, H, W, C), C in {1, 3}
    features: np.ndarray | None  # float32 (N, D)
    num_classes: int
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        return "image" if self.images is not None else "embedding"

    @property
    def has_labels(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels >= 0).all())

    def subset(self, indices) -> "Source":
        """The rows at `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Source(
            name=self.name,
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            features=None if self.features is None else self.features[idx],
            num_classes=self.num_classes,
            class_names=list(self.class_names),
        )


def load_source(name: str, root: str | None = None, *, image_size: int | None = None,
                split: str = "train", labels_file: str | None = None, num_workers: int = 0) -> Source:
    """Load source `name` (one of SOURCES) into memory; see the module docstring for the formats."""
    if name not in SOURCES:
        raise DataError(f"data.source: unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise DataError(f"data.split: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) != image_size
                                   or image_size < 1):
        raise DataError(f"data.image_size: must be a positive integer, got {image_size!r}")
    if name == "digits":
        return _load_digits()
    if name == "embeddings":
        return _load_embeddings(root, labels_file)
    if name == "imagelist":
        return _load_imagelist(root, labels_file, image_size or DEFAULT_IMAGE_SIZE, num_workers)
    path = _existing_root(name, root)
    if name == "mnist":
        return _load_mnist(path, split)
    if name == "cifar10":
        return _load_cifar10(path, split)
    if name in ("cifar100", "cifar20"):
        return _load_cifar100(path, split, coarse=name == "cifar20")
    if name == "stl10":
        return _load_stl10(path, split)
    return _load_imagefolder(path, image_size or DEFAULT_IMAGE_SIZE, num_workers)


def long_tail(source: Source, imbalance_ratio: float, n_max: int | None = None) -> tuple[Source, list[int]]:
    """The METHOD.md section 1 long-tailed subset of `source` and its per-class counts.

    n_max defaults to the smallest class size, so ratio 1 gives a balanced subset. A source without
    labels is returned unchanged (with counts []) for ratio 1 and no n_max; otherwise it is an error.
    """
    try:
        ratio = float(imbalance_ratio)
    except (TypeError, ValueError):
        ratio = float("nan")
    if not ratio >= 1.0 or ratio == float("inf"):
        raise DataError(f"data.imbalance_ratio: must be a finite number >= 1, got {imbalance_ratio!r}")
    if not source.has_labels:
        if ratio == 1.0 and n_max is None:
            return source, []
        raise DataError(f"data.imbalance_ratio: {source.name} has no labels and a long-tail subset needs "
                        "them; set data.imbalance_ratio=1 (or give labels, e.g. data.labels_file)")
    try:
        smallest = default_n_max(source.labels, source.num_classes)
    except ValueError as e:
        raise DataError(f"{source.name}: {e}; a long-tail subset needs every class 0..K-1") from None
    if n_max is not None and (isinstance(n_max, bool) or int(n_max) != n_max or not 1 <= n_max <= smallest):
        raise DataError(f"data.n_max: {n_max!r} must be an integer in 1..{smallest} (the smallest "
                        f"{source.name} class size); lower it or leave it unset")
    indices, counts = long_tail_subset(source.labels, ratio, n_max=n_max, num_classes=source.num_classes)
    return source.subset(indices), counts


# ----------------------------------------------------------------------------- paths


def _existing_root(name: str, root: str | None) -> Path:
    if root is None:
        raise DataError(f"data.root: not set; {name} expects {_EXPECTS[name]}, download it yourself "
                        "and pass data.root=PATH")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data.root: {path} does not exist; {name} expects {_EXPECTS[name]}, "
                        "download it yourself and pass data.root=PATH")
    return path


def _missing(name: str, folder: Path, what: str) -> DataError:
    return DataError(f"data.root: {folder} has no {what}; {name} expects {_EXPECTS[name]}, "
                     "download it yourself and pass data.root=PATH")


def _sub_or_self(root: Path, sub: str) -> Path:
    """`root/sub` when it is a folder (root is the parent), else root itself."""
    return root / sub if (root / sub).is_dir() else root


# ----------------------------------------------------------------------------- digits


def _load_digits() -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: no download
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return Source("digits", d.target.astype(np.int64), images, None, 10, [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- mnist (IDX)

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 dims / 1 dim


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except Exception as e:  # BadGzipFile, EOFError, zlib.error
            raise DataError(f"{path}: corrupt gzip file ({e}); download it again") from None
    return raw


def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = _read_maybe_gzip(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise DataError(f"{path}: not an IDX file with magic {magic} (found {found}); "
                        "use the original MNIST files")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise DataError(f"{path}: header says {dims} = {size} bytes but the file holds {len(raw) - header}; "
                        "the file is truncated or corrupt, download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_mnist(root: Path, split: str) -> Source:
    prefix = "train" if split == "train" else "t10k"
    images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if split == "train" and images is None and labels is None:
        test_images = _find_idx(root, "t10k-images-idx3-ubyte")
        test_labels = _find_idx(root, "t10k-labels-idx1-ubyte")
        if test_images is not None and test_labels is not None:
            log.warning("mnist: %s has no train-*-ubyte files; using the t10k (test) files", root)
            prefix, images, labels = "t10k", test_images, test_labels
    if images is None or labels is None:
        kind = "images" if images is None else "labels"
        raise _missing("mnist", root, f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte(.gz)")
    x = _read_idx(images, _IDX_IMAGES)
    y = _read_idx(labels, _IDX_LABELS).astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{images}: {len(x)} images but {labels.name} has {len(y)} labels; "
                        "use matching MNIST files")
    if y.size and y.max() > 9:
        raise DataError(f"{labels}: labels must be 0..9, found {int(y.max())}; use the original MNIST files")
    return Source("mnist", y, x[..., None].copy(), None, 10, [str(i) for i in range(10)])


# ----------------------------------------------------------------------------- cifar (pickles)


def _latin1_encode(text, encoding="latin1"):
    """Python 3 protocol-2 pickles store bytes as _codecs.encode(str, 'latin1'); allow only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin1 strings")
    return text.encode("latin-1")


# The globals a pickled numpy array needs, and nothing else. _reconstruct is taken from ndarray's own
# pickling so neither numpy.core (deprecated) nor numpy._core (numpy 2) has to be imported by name.
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused before it is built."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the CIFAR files are Python 2 pickles
        self.path = path

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.path}: refusing to unpickle global {module}.{name} (only numpy arrays "
                            "are allowed); use the original CIFAR files") from None


def _load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # any malformed pickle: truncated, bad opcode, bad numpy state, ...
        raise DataError(f"{path}: cannot read this pickle ({type(e).__name__}: {e}); "
                        "download the CIFAR files again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}; "
                        "use the original CIFAR files")
    return obj


def _get(batch: dict, key: bytes, path: Path):
    if key not in batch:
        raise DataError(f"{path}: no {key.decode()!r} entry; use the original CIFAR files")
    return batch[key]


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    data = np.asarray(_get(batch, b"data", path))
    labels = np.asarray(_get(batch, label_key, path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 N x 3072, got {data.dtype} {data.shape}; "
                        "use the original CIFAR files")
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}; "
                        "use the original CIFAR files")
    # Each row is the R, G and B planes of a 32x32 image, row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _cifar_names(meta_path: Path, key: bytes, count: int) -> list[str]:
    if not meta_path.is_file():
        return [str(i) for i in range(count)]
    names = _get(_load_pickle(meta_path), key, meta_path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_source(name: str, folder: Path, files: list[str], label_key: bytes, meta: str,
                  names_key: bytes, num_classes: int) -> Source:
    for f in files:
        if not (folder / f).is_file():
            raise _missing(name, folder, f)
    parts = [_cifar_batch(folder / f, label_key) for f in files]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{folder}: labels must be 0..{num_classes - 1}, found "
                        f"{labels.min()}..{labels.max()}; use the original CIFAR files")
    class_names = _cifar_names(folder / meta, names_key, num_classes)
    return Source(name, labels, images, None, num_classes, class_names)


def _load_cifar10(root: Path, split: str) -> Source:
    folder = _sub_or_self(root, "cifar-10-batches-py")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar_source("cifar10", folder, files, b"labels", "batches.meta", b"label_names", 10)


def _load_cifar100(root: Path, split: str, coarse: bool) -> Source:
    folder = _sub_or_self(root, "cifar-100-python")
    if coarse:
        return _cifar_source("cifar20", folder, [split], b"coarse_labels", "meta", b"coarse_label_names", 20)
    return _cifar_source("cifar100", folder, [split], b"fine_labels", "meta", b"fine_label_names", 100)


# ----------------------------------------------------------------------------- stl10 (binary)


def _stl_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    x_path, y_path = folder / f"{part}_X.bin", folder / f"{part}_y.bin"
    for p in (x_path, y_path):
        if not p.is_file():
            raise _missing("stl10", folder, p.name)
    x = np.fromfile(x_path, dtype=np.uint8)
    y = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
    pixels = 3 * 96 * 96
    if x.size % pixels or x.size // pixels != len(y):
        raise DataError(f"{x_path}: {x.size} bytes is not {len(y)} images of 3x96x96 (from {y_path.name}); "
                        "the files are truncated or mismatched, download them again")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{y_path}: labels must be 1..10; use the original STL-10 files")
    # Each channel is stored column-major: read as (N, C, W, H), then move to (N, H, W, C)
    # (the official reader's np.transpose(x, (0, 3, 2, 1))).
    return x.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1), y


def _load_stl10(root: Path, split: str) -> Source:
    folder = _sub_or_self(root, "stl10_binary")
    # METHOD.md uses STL-10 train + test merged, in that order, as the clustering set.
    parts = [_stl_part(folder, p) for p in (("train", "test") if split == "train" else ("test",))]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = np.concatenate([p[1] for p in parts])
    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.is_file() else list(STL10_CLASSES)
    if len(names) != 10:
        names = list(STL10_CLASSES)
    return Source("stl10", labels, images, None, 10, names)


# ----------------------------------------------------------------------------- image files


class _ImageFiles:
    """Map-style dataset decoding one file to uint8 (size, size, 3); errors come back as text.

    Errors are returned, not raised, so a worker's failure reaches the main process as a one-line
    DataError naming the file instead of a re-raised multi-line traceback.
    """

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
                return i, np.asarray(img, dtype=np.uint8), None
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
            return i, None, f"{type(e).__name__}: {e}"


def _as_list(batch):
    return batch


def _decode_images(paths: list[Path], size: int, num_workers: int, desc: str) -> np.ndarray:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    loader = DataLoader(_ImageFiles(paths, size), batch_size=64, num_workers=max(0, int(num_workers)),
                        collate_fn=_as_list)
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar:
        for batch in loader:
            for i, pixels, error in batch:
                if error is not None:
                    raise DataError(f"{paths[i]}: cannot read this image ({error}); "
                                    "remove or replace the file")
                out[i] = pixels
            bar.update(len(batch))
    return out


def _load_imagefolder(root: Path, size: int, num_workers: int) -> Source:
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a folder; imagefolder expects {_EXPECTS['imagefolder']}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise _missing("imagefolder", root, "class sub-folders")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"data.root: class folder {root / cls} has no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
        paths += files
        labels += [label] * len(files)
    images = _decode_images(paths, size, num_workers, "imagefolder")
    return Source("imagefolder", np.asarray(labels, dtype=np.int64), images, None, len(classes), classes)


def _read_list(list_path: Path) -> tuple[list[str], list[int]]:
    rel, labels = [], []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(None, 1)  # the label is the last field; a path may hold spaces
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise DataError(f"{list_path}:{lineno}: expected 'relative/path.jpg label' with an integer "
                            f"label >= 0, got {line.strip()!r}; fix the line")
        rel.append(parts[0])
        labels.append(int(parts[1]))
    if not rel:
        raise DataError(f"data.labels_file: {list_path} lists no images; "
                        "expected lines 'relative/path.jpg label'")
    return rel, labels


def _load_imagelist(root: str | None, labels_file: str | None, size: int, num_workers: int) -> Source:
    if labels_file is None:
        list_path = _existing_root("imagelist", root)
        if not list_path.is_file():
            raise DataError(f"data.labels_file: not set and data.root {list_path} is not a list file; "
                            f"imagelist expects {_EXPECTS['imagelist']}")
        image_root = list_path.parent
    else:
        list_path = Path(labels_file).expanduser()
        if not list_path.is_file():
            raise DataError(f"data.labels_file: {list_path} does not exist; imagelist expects "
                            f"{_EXPECTS['imagelist']}")
        image_root = list_path.parent if root is None else _existing_root("imagelist", root)
        if image_root.is_file():
            image_root = image_root.parent
    rel, labels = _read_list(list_path)
    images = _decode_images([image_root / r for r in rel], size, num_workers, "imagelist")
    y = np.asarray(labels, dtype=np.int64)
    num_classes = int(y.max()) + 1
    return Source("imagelist", y, images, None, num_classes, [str(i) for i in range(num_classes)])


# ----------------------------------------------------------------------------- embeddings


def _load_npy(path: Path, setting: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)  # never unpickle object arrays
    except Exception as e:
        raise DataError(f"{setting}: cannot read {path} as a plain .npy array ({type(e).__name__}: {e}); "
                        "save it with numpy.save of a numeric array") from None


def _load_embeddings(root: str | None, labels_file: str | None) -> Source:
    path = _existing_root("embeddings", root)
    labels_path = Path(labels_file).expanduser() if labels_file is not None else None
    if path.is_dir():
        features_path = path / "features.npy"
        if not features_path.is_file():
            raise _missing("embeddings", path, "features.npy")
        if labels_path is None and (path / "labels.npy").is_file():
            labels_path = path / "labels.npy"
    else:
        features_path = path
    x = _load_npy(features_path, "data.root")
    if x.ndim != 2 or x.dtype.kind not in "fiu" or len(x) == 0:
        raise DataError(f"data.root: {features_path} must be a non-empty numeric N x D array, got "
                        f"{x.dtype} {x.shape}; save features as a 2-D float array")
    features = np.ascontiguousarray(x, dtype=np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad_rows):  # found here, not as non-finite losses steps later
        raise DataError(f"data.root: {features_path} has {len(bad_rows)} row(s) with NaN or inf (first: row "
                        f"{bad_rows[0]}) or values beyond float32; drop or impute them and save again")
    if labels_path is None:
        return Source("embeddings", np.full(len(features), -1, dtype=np.int64), None, features, 0, [])
    if not labels_path.is_file():
        raise DataError(f"data.labels_file: {labels_path} does not exist; "
                        "pass a .npy of integer labels or leave it unset")
    y = _load_npy(labels_path, "data.labels_file")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(features):
        raise DataError(f"data.labels_file: {labels_path} must hold {len(features)} integer labels (one per "
                        f"row of {features_path.name}), got {y.dtype} {y.shape}")
    if y.min() < 0:
        raise DataError(f"data.labels_file: {labels_path} has negative labels; use labels 0..K-1")
    y = y.astype(np.int64)
    num_classes = int(y.max()) + 1
    return Source("embeddings", y, None, features, num_classes, [str(i) for i in range(num_classes)])
