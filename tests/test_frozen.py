"""Heads on frozen features (issue 15, item 3) and model.trainable (item 4), through real CLI runs on
the bundled digits: identity needs no --encoder and its K-means is the raw-input K-means; the residual
adapter starts as the identity map and then moves; frozen parameters stay exactly as loaded."""

from __future__ import annotations

import json

import pytest
import torch

from mcscale.cli import main
from mcscale.files import safe_torch_load
from mcscale.train.run_folder import checkpoint_paths

from test_pretrained import TINY_VIT, random_vit  # noqa: F401 (tiny_vit is a fixture)
from test_pretrained import tiny_vit  # noqa: F401

FAST = ["--cpu", "cluster.batch_size=128", "cluster.eval_every=0", "logging.report=false"]


@pytest.mark.parametrize("adapter", ["none", "residual_mlp"])
def test_identity_kmeans_is_the_input_kmeans_and_runs_resume_and_eval(tmp_path, capsys, adapter):
    out = tmp_path / "run"
    args = ["cluster", "--config", "digits_lt", "--out", str(out), "model.backbone=identity",
            f"model.adapter={adapter}", "cluster.lr=0.01", "cluster.checkpoint_every=2", *FAST]
    assert main([*args, "--max-steps", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kmeans"] == metrics["input_kmeans"]  # every number, per-class accuracies included
    state = safe_torch_load(checkpoint_paths(out)[-1][1])
    assert state["architecture"]["backbone"] == "identity" and state["identity"]["adapter"] == adapter
    if adapter == "residual_mlp":  # started at the identity map (last layer zero), then trained
        assert state["model"]["encoder.adapter.net.2.weight"].abs().max() > 0
    else:
        assert not [k for k in state["model"] if k.startswith("encoder.")]  # nothing to train but the heads

    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["kmeans"] == metrics["kmeans"] and resumed["final"]["steps"] == 3
    capsys.readouterr()
    assert main(["eval", str(out), "--cpu"]) == 0
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["final"]["acc"] == resumed["final"]["acc"]
    assert evaluated["input_kmeans"] == evaluated["kmeans"]


def test_identity_heads_start_on_the_input_kmeans_for_embeddings_too(tmp_path):
    rng = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 6, generator=rng) * 3
    labels = torch.arange(4).repeat_interleave(torch.tensor([40, 20, 12, 8]))
    x = centres[labels] + torch.randn(len(labels), 6, generator=rng)
    import numpy as np

    np.save(tmp_path / "features.npy", x.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    out = tmp_path / "run"
    assert main(["cluster", "--config", "digits_lt", "--out", str(out), "data.source=embeddings",
                 f"data.root={tmp_path}", "data.imbalance_ratio=null", "model.backbone=identity",
                 "cluster.num_aux=8", "--max-steps", "1", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kmeans"] == metrics["input_kmeans"]


@pytest.mark.parametrize("backbone,trainable", [("vit_b_16", "none"), ("vit_b_16", "last_block"),
                                                ("resnet18", "none"), ("resnet18", "last_block")])
def test_frozen_parameters_stay_as_loaded(tmp_path, tiny_vit, backbone, trainable):  # noqa: F811
    """Real steps at a large learning rate: every frozen tensor (BatchNorm statistics included) equals
    the weights file's; the trainable last block has moved."""
    if backbone == "vit_b_16":
        source, size = random_vit().state_dict(), 16
        last = ("encoder.layers.encoder_layer_2.", "encoder.ln.")
    else:
        torch.manual_seed(0)
        source, size = torchvision_resnet18_state(), 32
        last = ("layer4.1.",)
    path = tmp_path / "weights.pt"
    torch.save(source, path)
    out = tmp_path / "run"
    assert main(["cluster", "--config", "digits_lt", "--out", str(out), f"model.backbone={backbone}",
                 f"model.weights={path}", f"model.trainable={trainable}", f"data.image_size={size}",
                 "cluster.method=p2ot", "cluster.lr=0.05", "cluster.checkpoint_every=3", "--max-steps", "3",
                 *FAST]) == 0
    state = safe_torch_load(checkpoint_paths(out)[-1][1])["model"]
    prefix = "encoder.body.1."  # grey digits: Sequential(ThreeChannels, network)
    trained = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert trained.keys() == {k for k in source if not k.startswith(("fc.", "heads."))}
    moved = []
    for key, value in trained.items():
        if trainable == "last_block" and key.startswith(last):
            if not torch.equal(value, source[key]):
                moved.append(key)
        else:
            assert torch.equal(value, source[key]), key
    assert (len(moved) > 0) == (trainable == "last_block"), moved


def torchvision_resnet18_state() -> dict:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for buffer in net.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return net.state_dict()
