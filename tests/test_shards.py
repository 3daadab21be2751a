"""Sharded data: `mcscale prepare` (manifest, checksums, restarts), the WebDataset and DALI loaders
(round trips, rank split, padding, errors) and the augmentation distributions of all three loaders."""

import io
import json
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mcscale.config import AugmentConfig
from mcscale.data.augment import strong_view, to_float
from mcscale.data.sources import DataError, load_source, long_tail
from mcscale.data.shards import format as fmt
from mcscale.data.shards import prepare as prep
from mcscale.data.shards.batch import StreamViews, decode_ascii
from mcscale.data.shards.dali_loader import DaliLoader, dali_available
from mcscale.data.shards.webdataset_loader import WebDatasetLoader

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
LOADERS = [pytest.param("webdataset", id="webdataset"), pytest.param("dali", id="dali", marks=needs_dali)]


def make_loader(kind, folder, batch_size, **kw):
    if kind == "webdataset":
        return WebDatasetLoader(folder, batch_size, num_workers=kw.pop("num_workers", 2), **kw)
    kw.pop("num_workers", None)
    return DaliLoader(folder, batch_size, num_threads=2, **kw)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def subset():
    source = load_source("digits")
    return long_tail(source, 10)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, subset):
    out = tmp_path_factory.mktemp("digits_lt")
    manifest = prep.prepare("digits", None, 10, None, 100, out, show_progress=False)
    return out, manifest


# ----------------------------------------------------------------------------- prepare
def test_manifest_matches_the_long_tail_subset(prepared, subset):
    out, manifest = prepared
    sub, counts = subset
    assert manifest["num_samples"] == len(sub) == 707
    assert manifest["class_counts"] == counts and manifest["num_classes"] == 10
    assert manifest["source"] == "digits" and manifest["imbalance_ratio"] == 10 and manifest["n_max"] == counts[0]
    assert manifest["image_shape"] == [8, 8, 1] and manifest["encoding"] == ["png"]
    assert [s["num_samples"] for s in manifest["shards"]] == [100] * 7 + [7]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for i, shard in enumerate(manifest["shards"]):
        assert shard["path"] == fmt.shard_name(i) and shard["index"] == fmt.index_name(i)
        assert fmt.sha256_file(out / shard["path"]) == shard["sha256"]
        assert (out / shard["path"]).stat().st_size == shard["bytes"]
        assert fmt.sha256_file(out / shard["index"]) == shard["index_sha256"]
    assert np.array_equal(np.load(out / "labels.npy"), sub.labels)
    # The statistics are Normalizer.fit's on the stored images (float64 sums vs two-pass: ~1e-9).
    x = sub.images.astype(np.float64) / 255
    assert manifest["pixel_mean"][0] == pytest.approx(x.mean(), abs=1e-7)
    assert manifest["pixel_std"][0] == pytest.approx(x.std(ddof=1), abs=1e-7)


def test_shard_members_and_dali_index_format(prepared, subset):
    out, manifest = prepared
    sub, _ = subset
    data = (out / "shard-000001.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert len(members) == 300 and members[0].name.endswith(".png")
    lines = (out / "shard-000001.idx").read_text().splitlines()
    assert lines[0] == "v1.2 100" and len(lines) == 101
    for j, m in enumerate(members):  # member j is field j % 3 of sample j // 3 (line 1 + j // 3)
        ext, offset, size, name = lines[1 + j // 3].split()[4 * (j % 3):4 * (j % 3) + 4]
        assert (name, int(offset), int(size)) == (m.name, m.offset_data, m.size) and int(offset) % 512 == 0
    key = members[0].name.split(".")[0]
    fields = {m.name.split(".")[1]: data[m.offset_data:m.offset_data + m.size] for m in members[:3]}
    index = int(fields["idx"].decode("ascii"))
    assert key == f"{index:09d}" and int(fields["cls"].decode("ascii")) == sub.labels[index]
    png = Image.open(io.BytesIO(fields["png"]))
    assert png.mode == "L" and np.array_equal(np.asarray(png), sub.images[index, :, :, 0])  # lossless


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("shard-*"))}


def test_rerun_rewrites_only_missing_or_bad_shards(prepared, tmp_path):
    src, manifest = prepared
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    for p in out.glob("shard-*"):
        os.utime(p, ns=(10**18, 10**18))  # an old, recognisable time
    before = _mtimes(out)
    (out / "shard-000003.tar").unlink()
    (out / ".shard-000004.tar.k1ll3d.tmp").write_bytes(b"half a shard")  # a killed run's temp file
    (out / "..sha256-cache.json.k1ll3d.tmp").write_bytes(b"{")  # a loader killed while writing its cache
    bad = bytearray((out / "shard-000005.tar").read_bytes())
    bad[5000] ^= 0xFF  # same size, different bytes
    (out / "shard-000005.tar").write_bytes(bytes(bad))
    os.utime(out / "shard-000005.tar", ns=(10**18, 10**18))
    (out / "shard-000006.idx").unlink()  # rebuilt from its (valid) tar, which stays untouched

    again = prep.prepare("digits", None, 10, None, 100, out, show_progress=False)
    assert again == manifest and (out / "manifest.json").read_text() == (src / "manifest.json").read_text()
    after = _mtimes(out)
    rewritten = {name for name in before if after.get(name) != before[name]}
    assert rewritten == {"shard-000003.tar", "shard-000003.idx", "shard-000005.tar", "shard-000005.idx",
                         "shard-000006.idx"}
    assert (out / "shard-000003.tar").is_file() and not list(out.glob("*.tmp"))
    for shard in manifest["shards"]:
        assert fmt.sha256_file(out / shard["path"]) == shard["sha256"]


def test_killed_run_resumes_and_other_parameters_are_refused(prepared, tmp_path, monkeypatch):
    _, manifest = prepared
    out = tmp_path / "killed"
    real = prep._write_shard

    def dies_at_shard_3(folder, i, group, p):
        if i == 3:
            raise KeyboardInterrupt
        return real(folder, i, group, p)

    monkeypatch.setattr(prep, "_write_shard", dies_at_shard_3)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("digits", None, 10, None, 100, out, show_progress=False)
    assert not (out / "manifest.json").exists() and not (out / "shard-000003.tar").exists()
    monkeypatch.setattr(prep, "_write_shard", real)
    first = _mtimes(out)
    assert prep.prepare("digits", None, 10, None, 100, out, show_progress=False) == manifest
    assert all(_mtimes(out)[name] == t for name, t in first.items())  # shards 0-2 kept
    with pytest.raises(DataError) as err:
        prep.prepare("digits", None, 10, None, 50, out, show_progress=False)
    assert "shard_size 100 -> 50" in one_line(err)


def test_cli_parser_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert prep.main(["--source", "digits", "--imbalance-ratio", "none", "--shard-size", "500", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 1797 and len(manifest["shards"]) == 4 and manifest["n_max"] is None
    assert "--imbalance-ratio none" in " ".join(manifest["prepare_args"])
    assert prep.main(["--source", "embeddings", "--out", str(tmp_path / "e")]) == 1
    assert prep.main(["--source", "digits", "--n-max", "9999", "--out", str(tmp_path / "n")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "data.n_max" in err[1] and all(line.startswith("mcscale: error:") for line in err)


def test_image_files_keep_their_jpeg_bytes(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("a", 3), ("b", 2)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for j in range(n):
            pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{j}.jpg")
    Image.fromarray(rng.integers(0, 255, (12, 10, 4), dtype=np.uint8)).save(tmp_path / "imgs" / "b" / "9.png")  # RGBA
    out = tmp_path / "shards"
    manifest = prep.prepare("imagefolder", str(tmp_path / "imgs"), None, None, 4, out, show_progress=False)
    source = load_source("imagefolder", str(tmp_path / "imgs"))
    assert np.array_equal(np.load(out / "labels.npy"), source.labels)  # load_source's order
    assert manifest["encoding"] == ["jpg", "png"] and manifest["image_shape"] == [12, 10, 3]
    files = sorted((tmp_path / "imgs").rglob("*.*"))
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            for m in tar.getmembers():
                index = int(m.name.split(".")[0])
                data = tar.extractfile(m).read()
                if m.name.endswith(".jpg"):
                    assert data == files[index].read_bytes()  # passed through, not re-encoded
                if m.name.endswith(".png"):
                    assert Image.open(io.BytesIO(data)).mode == "RGB"  # RGBA re-encoded as RGB
    resized = prep.prepare("imagefolder", str(tmp_path / "imgs"), None, None, 4, tmp_path / "r", image_size=6,
                           show_progress=False)
    assert resized["image_shape"] == [6, 6, 3]


# ----------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("kind", LOADERS)
def test_round_trip_every_sample_once(kind, prepared, subset):
    out, manifest = prepared
    sub, _ = subset
    loader = make_loader(kind, out, 64, with_clean=True)
    batches = list(loader.clean_batches(100))
    assert [b.index.shape[0] for b in batches] == [100] * 7 + [7] and not any(b.padded.any() for b in batches)
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(707))
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.as_tensor(sub.labels)[index])
    clean = torch.cat([b.clean for b in batches])
    pixels = clean * torch.tensor(loader.std).view(1, -1, 1, 1) + torch.tensor(loader.mean).view(1, -1, 1, 1)
    original = torch.as_tensor(sub.images[index.numpy()]).permute(0, 3, 1, 2).float() / 255
    assert clean.shape == (707, 1, 8, 8) and (pixels - original).abs().max().item() < 1 / 255

    epoch = list(loader.epoch(0))
    assert len(epoch) == loader.steps_per_epoch == 707 // 64
    seen = torch.cat([b.index for b in epoch])
    assert seen.unique().numel() == seen.numel() == 11 * 64  # no repeats; 3 samples left for later epochs
    first = epoch[0]
    assert first.x1.shape == first.x2.shape == first.clean.shape == (64, 1, 8, 8) and first.x1.dtype == torch.float32
    assert not torch.equal(first.x1, first.x2)  # two independent views
    assert torch.equal(first.labels, torch.as_tensor(sub.labels)[first.index])


@pytest.mark.parametrize("kind", LOADERS)
def test_two_ranks_split_the_data(kind, prepared):
    out, _ = prepared
    ranks = [make_loader(kind, out, 32, rank=r, world_size=2) for r in range(2)]
    clean = [list(loader.clean_batches(100)) for loader in ranks]
    # ranges of 353 and 354 samples; both ranks yield 4 batches of sizes 100, 100, 100, 54
    assert [[b.index.shape[0] for b in c] for c in clean] == [[100, 100, 100, 54]] * 2
    assert [sum(int(b.padded.sum()) for b in c) for c in clean] == [1, 0]  # rank 0 repeats one sample
    real = [set(torch.cat([b.index[~b.padded] for b in c]).tolist()) for c in clean]
    assert len(real[0]) == 353 and len(real[1]) == 354
    assert real[0] | real[1] == set(range(707)) and not real[0] & real[1]
    for epoch in range(2):  # training: equal step counts, ranges swap each epoch, no overlap
        seen = [torch.cat([b.index for b in loader.epoch(epoch)]) for loader in ranks]
        assert [s.numel() for s in seen] == [707 // 64 * 32] * 2
        assert all(set(s.tolist()) <= real[(r + epoch) % 2] for r, s in enumerate(seen))


def test_webdataset_batches_replay_exactly(prepared):
    """Order and augmentations are functions of (seed, epoch, rank, num_workers): a resumed run sees
    the batches of the uninterrupted run."""
    out, _ = prepared
    views = StreamViews(WebDatasetLoader(out, 64, num_workers=0, seed=3))
    steps = [views.two_views(3, step, 64) for step in range(13)]  # crosses into epoch 1
    resumed = StreamViews(WebDatasetLoader(out, 64, num_workers=0, seed=3)).two_views(3, 12, 64)
    assert torch.equal(resumed.index, steps[12].index) and torch.equal(resumed.x1, steps[12].x1)
    assert not torch.equal(steps[0].index, steps[11].index)
    assert len(views) == 707 and views.in_channels == 1 and views.image_size == 8


def test_decode_ascii():
    codes = torch.tensor([[55, 0, 0], [49, 50, 51], [48, 0, 0]], dtype=torch.uint8)
    assert decode_ascii(codes).tolist() == [7, 123, 0]


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def damaged(prepared, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(prepared[0], out, ignore=shutil.ignore_patterns(".sha256-cache.json"))  # the loaders' cache
    return out


@pytest.mark.parametrize("kind", LOADERS)
def test_truncated_or_missing_shard_is_one_line(kind, damaged):
    path = damaged / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[:50_000])
    with pytest.raises(DataError) as err:
        make_loader(kind, damaged, 32)
    msg = one_line(err)
    assert "shard-000002.tar" in msg and "truncated" in msg and "mcscale prepare --source digits" in msg
    path.unlink()
    with pytest.raises(DataError) as err:
        make_loader(kind, damaged, 32)
    assert "shard-000002.tar: shard missing" in one_line(err)


@needs_dali
def test_missing_index_is_one_line_for_dali(damaged):
    (damaged / "shard-000004.idx").unlink()
    with pytest.raises(DataError) as err:
        DaliLoader(damaged, 32)
    assert "shard-000004.idx" in one_line(err) and "mcscale prepare" in str(err.value)
    assert len(list(WebDatasetLoader(damaged, 100, num_workers=0).clean_batches())) == 8  # needs no index


@pytest.mark.parametrize("kind", LOADERS)
def test_corrupt_shard_content_is_one_line(kind, damaged, monkeypatch):
    """Damage the checksum cannot see (a shard changed after the loader was built): reading reports it."""
    from mcscale.data.shards import base

    path = damaged / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[100_000:140_000] = bytes(40_000)  # same size: only reading (or the checksum) finds it
    path.write_bytes(bytes(data))
    monkeypatch.setattr(base, "verify_checksums", lambda *args, **kwargs: 0)
    loader = make_loader(kind, damaged, 100)
    with pytest.raises(DataError) as err:
        list(loader.clean_batches())
    assert "shard-000002.tar" in one_line(err)


def _flip_middle(path):
    """Same size, other bytes (a flipped bit in a copy): the size check cannot see it."""
    data = bytearray(path.read_bytes())
    size = len(data)
    data[size // 2:size // 2 + 64] = bytes(b ^ 0xFF for b in data[size // 2:size // 2 + 64])
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


@pytest.mark.parametrize("kind", LOADERS)
def test_same_size_corrupt_shard_is_refused_when_the_loader_is_built(kind, damaged):
    _flip_middle(damaged / "shard-000002.tar")
    with pytest.raises(DataError) as err:
        make_loader(kind, damaged, 32)
    msg = one_line(err)
    assert "shard-000002.tar: checksum mismatch" in msg and "corrupt shard" in msg
    assert "mcscale prepare --source digits" in msg and f"--out {damaged}" in msg
    # the named fix works: prepare rewrites the bad shard, the loader then accepts the folder
    prep.prepare("digits", None, 10, None, 100, damaged, show_progress=False)
    assert make_loader(kind, damaged, 32).num_samples == 707


def test_cli_refuses_a_corrupt_shard_in_one_line(damaged, tmp_path, capsys):
    from mcscale.cli import main

    _flip_middle(damaged / "shard-000005.tar")
    code = main(["pretrain", "--config", "digits_lt", "--cpu", "--batch-size", "128", "--max-steps", "1", "augment.policy=crop",
                 "--out", str(tmp_path / "run"), "model.proj_hidden=32", "model.proj_dim=16",
                 "logging.report=false", "data.loader=webdataset", f"data.shards={damaged}", "data.num_workers=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("mcscale: error: ") and "shard-000005.tar: checksum mismatch" in err[0]
    assert "mcscale prepare --source digits" in err[0]


@pytest.fixture
def hashed(monkeypatch):
    """The files mcscale.files.sha256_of hashes (it still hashes them); the per-process memory of
    verified files starts empty."""
    from mcscale import files as file_io
    from mcscale.data.shards import verify

    calls, real = [], file_io.sha256_of

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(file_io, "sha256_of", counting)
    monkeypatch.setattr(verify, "_verified", set())
    return calls


def _age(folder, seconds_ago=10**6):
    """Shard mtimes well in the past: fresh files are hashed but not cached (verify.RACY_NS)."""
    old = 10**18 - seconds_ago * 10**9
    for p in folder.glob("shard-*"):
        os.utime(p, ns=(old, old))


def test_checksum_cache_skips_hashing_until_a_shard_changes(damaged, hashed, monkeypatch):
    from mcscale.data.shards import verify

    shards = [f"shard-{i:06d}.tar" for i in range(8)]
    _age(damaged)
    WebDatasetLoader(damaged, 32, num_workers=0)
    assert sorted(hashed) == shards
    cache = json.loads((damaged / verify.CACHE).read_text())
    assert sorted(os.path.basename(k) for k in cache["files"]) == shards
    entry = cache["files"][str((damaged / "shard-000003.tar").resolve())]
    stat = (damaged / "shard-000003.tar").stat()
    assert entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns

    hashed.clear()
    monkeypatch.setattr(verify, "_verified", set())  # a new process: the file on disk answers
    WebDatasetLoader(damaged, 32, num_workers=0)
    assert hashed == []
    (damaged / verify.CACHE).unlink()  # the same process: its memory answers (and rewrites the file)
    WebDatasetLoader(damaged, 32, num_workers=0)
    assert hashed == [] and json.loads((damaged / verify.CACHE).read_text()) == cache

    monkeypatch.setattr(verify, "_verified", set())
    os.utime(damaged / "shard-000003.tar", ns=(10**18, 10**18))  # touched: a new mtime, same bytes
    WebDatasetLoader(damaged, 32, num_workers=0)
    assert hashed == ["shard-000003.tar"]

    hashed.clear()
    _flip_middle(damaged / "shard-000006.tar")  # new bytes (and mtime), same size
    for attempt in range(2):  # a mismatch is never cached
        with pytest.raises(DataError) as err:
            WebDatasetLoader(damaged, 32, num_workers=0)
        assert "shard-000006.tar: checksum mismatch" in one_line(err)
    assert hashed == ["shard-000006.tar"] * 2
    files = json.loads((damaged / verify.CACHE).read_text())["files"]
    assert str((damaged / "shard-000006.tar").resolve()) not in files and len(files) == 7


def test_freshly_written_shards_are_hashed_but_not_cached(damaged, hashed):
    from mcscale.data.shards import verify

    now = time.time_ns()
    for p in damaged.glob("shard-*"):
        os.utime(p, ns=(now, now))  # within RACY_NS: a write in the same timestamp tick could hide
    for _ in range(2):
        WebDatasetLoader(damaged, 32, num_workers=0)
    assert len(hashed) == 16 and not (damaged / verify.CACHE).exists()


def test_checksum_cache_of_a_read_only_folder(damaged, hashed, monkeypatch, tmp_path):
    from mcscale import files as file_io
    from mcscale.data.shards import verify

    real = file_io.atomic_write_json
    refused = []

    def read_only(path, obj):
        if path.parent == damaged or "everywhere" in refused:
            refused.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, obj)

    monkeypatch.setattr(file_io, "atomic_write_json", read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _age(damaged)
    WebDatasetLoader(damaged, 32, num_workers=0)
    fallback = verify.cache_locations(damaged)[1]
    assert refused == [damaged / verify.CACHE] and not (damaged / verify.CACHE).exists()
    assert fallback.is_relative_to(tmp_path / "xdg" / "mcscale") and len(hashed) == 8
    assert len(json.loads(fallback.read_text())["files"]) == 8
    hashed.clear()
    monkeypatch.setattr(verify, "_verified", set())
    WebDatasetLoader(damaged, 32, num_workers=0)
    assert hashed == []

    refused.append("everywhere")  # no writable cache at all: checked every time, never an error
    monkeypatch.setattr(verify, "_verified", set())
    fallback.unlink()
    for _ in range(2):
        WebDatasetLoader(damaged, 32, num_workers=0)
    assert len(hashed) == 8 and not fallback.exists()  # the second build: this process's memory


def test_stale_dali_index_is_refused(damaged):
    from mcscale.data.shards.verify import verify_checksums

    index = damaged / "shard-000004.idx"
    lines = index.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # right header and size, wrong offsets for two samples
    index.write_text("\n".join(lines) + "\n")
    manifest = fmt.load_manifest(damaged, need_index=True)
    assert verify_checksums(manifest) == 8  # the WebDataset loader reads no index
    with pytest.raises(DataError) as err:
        verify_checksums(manifest, need_index=True)
    msg = one_line(err)
    assert "shard-000004.idx: checksum mismatch" in msg and "DALI index of shard-000004.tar" in msg
    assert "mcscale prepare --source digits" in msg


# ----------------------------------------------------------------------------- augmentation distributions
OUT = 32


def _ramp(size=64):
    """R grows left to right, G top to bottom: a view's slopes give its crop box and flip."""
    ramp = np.rint((np.arange(size) + 0.5) / size * 255).astype(np.uint8)
    img = np.full((size, size, 3), 60, np.uint8)
    img[..., 0], img[..., 1] = ramp[None, :], ramp[:, None]
    return img


def _geometry(views):
    """Per view: signed width fraction (from the interior R slope; < 0 when flipped), height fraction."""
    q1, q3 = OUT // 4, 3 * OUT // 4
    w = (views[:, 0, :, q3] - views[:, 0, :, q1]).mean(1) * OUT / (q3 - q1)
    h = (views[:, 1, q3, :] - views[:, 1, q1, :]).mean(1) * OUT / (q3 - q1)
    area = w.abs() * h
    return {"flipped": (w < 0).float().mean(), "area": area.mean(), "area_sd": area.std(),
            "log_aspect_sd": (w.abs() / h).log().std()}


def _brightness(views):
    m = views.mean(dim=(1, 2, 3))
    return {"mean": m.mean(), "sd": m.std(), "unchanged": ((m - 128 / 255).abs() < 2e-3).float().mean()}


# One standard error for n = 1024 views is about 0.016 (flip fraction), 0.007 (area), 0.0032 (mean
# brightness), 0.0125 (unchanged fraction); tolerances are about 4 standard errors of a difference.
TOLERANCES = {"flipped": 0.08, "area": 0.04, "area_sd": 0.03, "log_aspect_sd": 0.03,
              "mean": 0.02, "sd": 0.015, "unchanged": 0.07}


def _loader_views(loader):
    views = torch.cat([torch.cat([b.x1, b.x2]) for epoch in range(2) for b in loader.epoch(epoch)])
    return views  # mean 0, std 1 normalisation: the pixels themselves


def test_three_loaders_agree_in_distribution(tmp_path):
    n = 256
    geometry = AugmentConfig(jitter_p=0.0, grayscale_p=0.0)
    images = {"ramp": _ramp(), "grey": np.full((OUT, OUT, 3), 128, np.uint8)}
    configs = {"ramp": geometry, "grey": AugmentConfig()}
    stats = {"ramp": _geometry, "grey": _brightness}
    for name, img in images.items():
        prep.write_arrays(np.repeat(img[None], n, 0), np.zeros(n, np.int64), tmp_path / name, 64)
        x = to_float(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(4 * n, 1, 1, 1))
        reference = stats[name](strong_view(x, configs[name], OUT, torch.Generator().manual_seed(0)))
        kinds = ["webdataset"] + (["dali"] if dali_available() else [])
        for kind in kinds:
            loader = make_loader(kind, tmp_path / name, 64, augment=configs[name], image_size=OUT,
                                 mean=[0.0] * 3, std=[1.0] * 3)
            got = stats[name](_loader_views(loader))
            for key, ref in reference.items():
                assert abs(got[key] - ref) < TOLERANCES[key], (name, kind, key, float(got[key]), float(ref))
    # the expected values themselves: flip 0.5; brightness factor U[0.6, 1.4] with p 0.8 -> mean 0.5,
    # sd of the per-view mean 0.5 * sqrt(0.8 * 0.8**2 / 12) = 0.103, 20 % unchanged
    assert abs(reference["sd"] - 0.103) < 0.01 and abs(reference["unchanged"] - 0.2) < 0.04


def test_build_loader_falls_back_without_dali(prepared, monkeypatch, caplog):
    from mcscale.data.shards import dali_loader
    from mcscale.data.shards.loaders import build_loader

    monkeypatch.setattr(dali_loader, "dali_available", lambda: False)
    loader = build_loader("dali", prepared[0], 32, num_workers=0)
    assert isinstance(loader, WebDatasetLoader) and "using the webdataset loader" in caplog.text
    with pytest.raises(DataError):
        build_loader("tensor", prepared[0], 32)
