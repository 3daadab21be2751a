"""Dataset readers: tiny fake files in each real format, exact round trips, errors, safe unpickling."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcscale.data.longtail import long_tail_counts
from mcscale.data.sources import SOURCES, DataError, Source, load_source, long_tail

MNIST_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-test"


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- writers


def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool):
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) as in the CIFAR files: R, G, B planes, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def dump(path: Path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


class Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 str opcodes (no _codecs.encode), like the original CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def dump_py2_style(path: Path, obj):
    import io

    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    # Files written under numpy 1.x name the reconstructor numpy.core.multiarray.
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def make_cifar10(folder: Path, per_batch=3, py2_style=False):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write = dump_py2_style if py2_style else dump
    all_images, all_labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        write(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": cifar_rows(images),
                              b"filenames": [b"f.png"] * per_batch})
        all_images.append(images)
        all_labels.append(labels)
    names = [f"class{i}".encode() for i in range(10)]
    write(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return all_images, all_labels


# ----------------------------------------------------------------------------- errors


def test_unknown_source_lists_sources():
    with pytest.raises(DataError) as e:
        load_source("imagenet")
    msg = one_line(e)
    assert "data.source" in msg and all(s in msg for s in SOURCES)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar20", "cifar100", "stl10", "imagefolder", "embeddings"])
def test_missing_root(tmp_path, name):
    with pytest.raises(DataError) as e:
        load_source(name)
    assert "data.root" in one_line(e)
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        load_source(name, str(missing))
    msg = one_line(e)
    assert str(missing) in msg and "does not exist" in msg and "data.root=PATH" in msg
    if name.startswith("cifar"):
        assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg


def test_bad_split():
    with pytest.raises(DataError, match="data.split"):
        load_source("digits", split="val")


# ----------------------------------------------------------------------------- digits


def test_digits_exact_values():
    from sklearn.datasets import load_digits

    d = load_digits()
    src = load_source("digits", "/ignored")
    assert src.kind == "image" and len(src) == 1797 and src.num_classes == 10 and src.has_labels
    assert src.images.shape == (1797, 8, 8, 1) and src.images.dtype == np.uint8
    assert np.array_equal(src.images[..., 0], np.round(d.images * 255 / 16).astype(np.uint8))
    assert src.images.max() == 255
    assert src.labels.dtype == np.int64 and np.array_equal(src.labels, d.target)


def test_long_tail_digits_ratio_10():
    src = load_source("digits")
    assert np.bincount(src.labels).min() == 174
    sub, counts = long_tail(src, 10)
    assert counts == long_tail_counts(174, 10, 10)
    assert np.bincount(sub.labels, minlength=10).tolist() == counts
    assert len(sub) == sum(counts) and sub.images.shape == (sum(counts), 8, 8, 1)
    # First samples of each class, in dataset order.
    first0 = np.flatnonzero(src.labels == 0)[:counts[0]]
    assert np.array_equal(sub.images[sub.labels == 0], src.images[first0])
    balanced, counts1 = long_tail(src, 1)
    assert counts1 == [174] * 10 and len(balanced) == 1740


def test_long_tail_bad_settings():
    src = load_source("digits")
    with pytest.raises(DataError, match="data.n_max"):
        long_tail(src, 10, n_max=175)
    with pytest.raises(DataError, match="data.imbalance_ratio"):
        long_tail(src, 0.5)


def test_subset_keeps_given_order():
    src = load_source("digits")
    sub = src.subset([5, 2, 5])
    assert sub.labels.tolist() == [src.labels[5], src.labels[2], src.labels[5]]
    assert np.array_equal(sub.images[1], src.images[2])


# ----------------------------------------------------------------------------- mnist


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    ext = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", 2051, x, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", 2049, y, compress)
    src = load_source("mnist", str(tmp_path))
    assert src.images.shape == (5, 28, 28, 1) and np.array_equal(src.images[..., 0], x)
    assert src.labels.tolist() == y.tolist() and src.num_classes == 10


def test_mnist_train_falls_back_to_test_files(tmp_path):
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    x[1, 3, 4] = 77
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, x, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, np.array([0, 9]), True)
    for split in ("train", "test"):
        src = load_source("mnist", str(tmp_path), split=split)
        assert src.labels.tolist() == [0, 9] and src.images[1, 3, 4, 0] == 77


def test_mnist_bad_files(tmp_path):
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 2049, x, False)  # wrong magic
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", 2049, np.array([0, 1]), False)
    with pytest.raises(DataError, match="magic 2051"):
        load_source("mnist", str(tmp_path), split="test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", 2051, x, False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(DataError) as e:
        load_source("mnist", str(tmp_path), split="test")
    assert "truncated" in one_line(e)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError) as e:
        load_source("mnist", str(tmp_path), split="test")
    assert "t10k-images-idx3-ubyte" in one_line(e)


@pytest.mark.skipif(not MNIST_TEST.is_dir(), reason="shared MNIST test data not present")
def test_mnist_real_test_set():
    src = load_source("mnist", str(MNIST_TEST), split="test")
    assert src.images.shape == (10000, 28, 28, 1) and src.images.dtype == np.uint8
    assert np.bincount(src.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    sub, counts = long_tail(src, 10)
    assert len(sub) == sum(counts) == 3642


# ----------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("py2_style", [False, True])
def test_cifar10_round_trip(tmp_path, py2_style):
    images, labels = make_cifar10(tmp_path / "cifar-10-batches-py", py2_style=py2_style)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train = load_source("cifar10", str(root))
        assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
        assert np.array_equal(train.images, np.concatenate(images[:5]))
        assert train.labels.tolist() == sum(labels[:5], [])
        assert train.class_names == [f"class{i}" for i in range(10)] and train.num_classes == 10
    test = load_source("cifar10", str(tmp_path), split="test")
    assert np.array_equal(test.images, images[5]) and test.labels.tolist() == labels[5]


def test_cifar10_missing_batch(tmp_path):
    make_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        load_source("cifar10", str(tmp_path))
    assert "data_batch_3" in one_line(e)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    dump(folder / "data_batch_2", {b"data": Payload(), b"labels": [0]})
    # Control: an ordinary pickle.load would run the payload.
    live = tmp_path / "live"
    dump(live, {b"x": Payload()})
    with open(live, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(DataError) as e:
        load_source("cifar10", str(tmp_path))
    msg = one_line(e)
    assert "data_batch_2" in msg and "system" in msg
    assert not marker.exists()


def test_cifar_corrupt_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar10(folder)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DataError) as e:
        load_source("cifar10", str(tmp_path), split="test")
    assert "test_batch" in one_line(e)


def test_cifar100_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    fine, coarse = [99, 0, 42, 7], [19, 0, 3, 1]
    for split in ("train", "test"):
        dump(folder / split, {b"data": cifar_rows(images), b"fine_labels": fine, b"coarse_labels": coarse,
                              b"filenames": [b"a"] * 4, b"batch_label": split.encode()})
    dump(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"c{i}".encode() for i in range(20)]})
    c100 = load_source("cifar100", str(tmp_path))
    assert c100.labels.tolist() == fine and c100.num_classes == 100 and c100.class_names[99] == "f99"
    assert np.array_equal(c100.images, images)
    c20 = load_source("cifar20", str(folder), split="test")
    assert c20.labels.tolist() == coarse and c20.num_classes == 20 and c20.class_names[19] == "c19"


# ----------------------------------------------------------------------------- stl10


def write_stl(folder: Path, part: str, labels: list[int], marks: dict):
    """marks: {(image, h, w, channel): value}, stored in the file's column-major layout."""
    x = np.zeros((len(labels), 3, 96, 96), dtype=np.uint8)  # file order: (N, C, W, H)
    for (n, h, w, c), v in marks.items():
        x[n, c, w, h] = v
    x.tofile(folder / f"{part}_X.bin")
    np.asarray(labels, dtype=np.uint8).tofile(folder / f"{part}_y.bin")


def test_stl10_orientation_and_merge(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    write_stl(folder, "train", [1, 10], {(0, 5, 7, 0): 200, (1, 90, 2, 2): 33})
    write_stl(folder, "test", [4, 5, 6], {(2, 0, 95, 1): 99})
    src = load_source("stl10", str(tmp_path))
    assert src.images.shape == (5, 96, 96, 3) and src.images.flags.c_contiguous
    assert src.labels.tolist() == [0, 9, 3, 4, 5]  # train then test, labels 1..10 -> 0..9
    assert src.images[0, 5, 7, 0] == 200 and src.images[0, 7, 5, 0] == 0
    assert src.images[1, 90, 2, 2] == 33 and src.images[4, 0, 95, 1] == 99
    assert int(src.images.astype(int).sum()) == 200 + 33 + 99
    test = load_source("stl10", str(folder), split="test")
    assert test.labels.tolist() == [3, 4, 5] and test.images[2, 0, 95, 1] == 99
    assert test.class_names[0] == "airplane"


def test_stl10_size_mismatch(tmp_path):
    write_stl(tmp_path, "train", [1, 2], {})
    write_stl(tmp_path, "test", [1], {})
    np.zeros(5, dtype=np.uint8).tofile(tmp_path / "test_y.bin")
    with pytest.raises(DataError) as e:
        load_source("stl10", str(tmp_path))
    assert "test_X.bin" in one_line(e)


# ----------------------------------------------------------------------------- image files


def solid(path: Path, color, size=(4, 6), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)


def test_imagefolder_sorted_classes_and_pixels(tmp_path):
    solid(tmp_path / "n02" / "images" / "b.png", (10, 20, 30))
    solid(tmp_path / "n02" / "images" / "a.PNG", (1, 2, 3))
    solid(tmp_path / "n01" / "images" / "z.png", 128, mode="L")  # grey -> RGB
    solid(tmp_path / "n01" / "x.JPEG", (200, 100, 50), fmt="JPEG")
    (tmp_path / "n01_boxes.txt").write_text("not a class folder")
    (tmp_path / "n01" / "notes.txt").write_text("ignored")
    src = load_source("imagefolder", str(tmp_path), image_size=8)
    assert src.class_names == ["n01", "n02"] and src.num_classes == 2
    assert src.images.shape == (4, 8, 8, 3) and src.images.dtype == np.uint8
    assert src.labels.tolist() == [0, 0, 1, 1]
    # Sorted by path within a class: images/z.png < x.JPEG; a.PNG < b.png.
    assert np.all(src.images[0] == 128)
    assert np.abs(src.images[1].astype(int) - [200, 100, 50]).max() <= 3  # JPEG is lossy
    assert np.all(src.images[2] == [1, 2, 3]) and np.all(src.images[3] == [10, 20, 30])
    assert load_source("imagefolder", str(tmp_path)).images.shape == (4, 64, 64, 3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagefolder_unreadable_file(tmp_path, num_workers):
    solid(tmp_path / "a" / "ok.png", (1, 2, 3))
    bad = tmp_path / "b" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as e:
        load_source("imagefolder", str(tmp_path), image_size=4, num_workers=num_workers)
    assert str(bad) in one_line(e)


def test_imagefolder_empty_class(tmp_path):
    solid(tmp_path / "a" / "ok.png", (1, 2, 3))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_source("imagefolder", str(tmp_path))


def test_imagelist(tmp_path):
    images = tmp_path / "imgs"
    solid(images / "train" / "x" / "1.png", (5, 5, 5))
    solid(images / "train" / "y" / "2.png", (9, 9, 9))
    lst = tmp_path / "list.txt"
    lst.write_text("train/y/2.png 3\n\ntrain/x/1.png 0\n")
    src = load_source("imagelist", str(images), labels_file=str(lst), image_size=2)
    assert src.labels.tolist() == [3, 0] and src.num_classes == 4  # file order kept
    assert np.all(src.images[0] == 9) and np.all(src.images[1] == 5) and src.images.shape == (2, 2, 2, 3)
    # root = the list file: paths relative to its folder.
    lst2 = images / "list.txt"
    lst2.write_text("train/x/1.png 1\n")
    assert load_source("imagelist", str(lst2), image_size=2).labels.tolist() == [1]


def test_imagelist_malformed_line(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.png 0\nb.png\n")
    with pytest.raises(DataError) as e:
        load_source("imagelist", str(tmp_path), labels_file=str(lst))
    assert f"{lst}:2" in one_line(e)
    lst.write_text("a.png 0\nb.png cat\n")
    with pytest.raises(DataError, match=":2:"):
        load_source("imagelist", str(lst))


def test_imagelist_missing_image(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("missing.png 0\n")
    with pytest.raises(DataError) as e:
        load_source("imagelist", str(lst))
    assert "missing.png" in one_line(e)


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_file_and_folder(tmp_path):
    feats = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.save(tmp_path / "f.npy", feats)
    src = load_source("embeddings", str(tmp_path / "f.npy"))
    assert src.kind == "embedding" and src.images is None
    assert src.features.dtype == np.float32 and np.array_equal(src.features, feats)
    assert not src.has_labels and src.labels.tolist() == [-1] * 4
    same, counts = long_tail(src, 1)
    assert same is src and counts == []
    with pytest.raises(DataError) as e:
        long_tail(src, 10)
    assert "labels" in one_line(e)

    folder = tmp_path / "emb"
    folder.mkdir()
    np.save(folder / "features.npy", feats.astype(np.float32))
    np.save(folder / "labels.npy", np.array([1, 0, 1, 2]))
    src = load_source("embeddings", str(folder))
    assert src.has_labels and src.labels.tolist() == [1, 0, 1, 2] and src.num_classes == 3
    np.save(tmp_path / "other.npy", np.array([0, 0, 0, 0]))
    assert load_source("embeddings", str(folder), labels_file=str(tmp_path / "other.npy")).labels.tolist() == [0] * 4


def test_embeddings_errors(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((4, 3), dtype=np.float32))
    np.save(tmp_path / "short.npy", np.array([0, 1]))
    with pytest.raises(DataError) as e:
        load_source("embeddings", str(tmp_path / "f.npy"), labels_file=str(tmp_path / "short.npy"))
    assert "data.labels_file" in one_line(e)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="plain .npy"):
        load_source("embeddings", str(tmp_path / "obj.npy"))
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(DataError, match="N x D"):
        load_source("embeddings", str(tmp_path / "flat.npy"))


def test_source_is_dataclass():
    src = Source("x", np.array([0, 1]), None, np.zeros((2, 3), np.float32), 2, ["a", "b"])
    assert len(src) == 2 and src.kind == "embedding" and src.has_labels
