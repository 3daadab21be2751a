"""`mcscale embed` (issue 15, item 5): the clean view through the encoder into features.npy +
labels.npy, in chunks, equal to the encoder's own forward; read back with data.source=embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcscale.cli import main
from mcscale.config import load_config
from mcscale.data.loading import load_views
from mcscale.data.sources import load_source
from mcscale.train.encoders import open_encoder

from test_pretrained import random_vit
from test_pretrained import tiny_vit  # noqa: F401 (fixture)


def test_embed_equals_the_encoders_forward_on_the_clean_view(tmp_path, capsys, tiny_vit):  # noqa: F811
    weights = tmp_path / "vit.pt"
    torch.save(random_vit().state_dict(), weights)
    overrides = ["model.backbone=vit_b_16", f"model.weights={weights}", "data.image_size=16"]
    out = tmp_path / "emb"
    # 707 samples in chunks of 100: the last chunk is partial
    assert main(["embed", "--config", "digits_lt", "--cpu", "--out", str(out), "--batch-size", "100", *overrides]) == 0
    assert "data.source=embeddings" in capsys.readouterr().out
    features, labels = np.load(out / "features.npy"), np.load(out / "labels.npy")
    assert sorted(p.name for p in out.iterdir()) == ["features.npy", "labels.npy"]  # no temporary left

    cfg = load_config("digits_lt", overrides)
    subset, _, views = load_views(cfg, torch.device("cpu"))
    encoder, arch = open_encoder(cfg, None, views, torch.device("cpu"))
    encoder.eval()
    with torch.no_grad():
        expected = encoder(views.clean(torch.arange(len(views))))
    assert features.shape == (707, TINY_WIDTH) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected.numpy(), rtol=0, atol=1e-5)
    assert np.array_equal(labels, subset.labels)

    back = load_source("embeddings", str(out))  # what data.source=embeddings reads
    assert np.array_equal(back.features, features) and np.array_equal(back.labels, labels)


TINY_WIDTH = 24


def test_identity_embedding_is_the_clean_view_and_clusters_back(tmp_path):
    out = tmp_path / "emb"
    assert main(["embed", "--config", "digits_lt", "--cpu", "--out", str(out), "model.backbone=identity"]) == 0
    cfg = load_config("digits_lt", ["model.backbone=identity"])
    _, _, views = load_views(cfg, torch.device("cpu"))
    pixels = views.clean(torch.arange(len(views))).flatten(1).numpy()
    assert np.array_equal(np.load(out / "features.npy"), pixels)

    run = tmp_path / "run"
    assert main(["cluster", "--config", "digits_lt", "--cpu", "--out", str(run), "data.source=embeddings",
                 f"data.root={out}", "data.imbalance_ratio=null", "model.backbone=identity", "--max-steps", "1",
                 "logging.report=false", "cluster.eval_every=0"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kmeans"] == metrics["input_kmeans"]
    config = (run / "config.yaml").read_text()
    assert "num_samples: 707" in config


def test_embed_from_a_byol_run(tmp_path):
    enc = tmp_path / "byol"
    small = ["model.proj_hidden=32", "model.proj_dim=16", "logging.report=false"]
    assert main(["pretrain", "--config", "digits_lt", "--cpu", "--out", str(enc), "--max-steps", "1",
                 "--batch-size", "64", *small]) == 0
    out = tmp_path / "emb"
    assert main(["embed", "--config", "digits_lt", "--cpu", "--out", str(out), "--encoder", str(enc), *small]) == 0
    cfg = load_config("digits_lt", small)
    _, _, views = load_views(cfg, torch.device("cpu"))
    encoder, arch = open_encoder(cfg, enc, views, torch.device("cpu"))
    encoder.eval()
    with torch.no_grad():
        expected = encoder(views.clean(torch.arange(len(views)))).numpy()
    np.testing.assert_allclose(np.load(out / "features.npy"), expected, rtol=0, atol=1e-5)
    assert arch["feature_dim"] == 16


@pytest.mark.parametrize("extra,needle", [
    ([], "embed: no encoder: pass --encoder RUN"),
    (["model.backbone=identity", "--encoder", "somewhere"], "--encoder and model.backbone=identity both name"),
])
def test_embed_needs_exactly_one_encoder(tmp_path, capsys, extra, needle):
    code = main(["embed", "--config", "digits_lt", "--cpu", "--out", str(tmp_path / "e"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
