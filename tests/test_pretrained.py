"""Pretrained encoders from a local weights file (issue 15, item 4): torchvision state dicts (.pt and
.safetensors) and DINO's ViT key layout load into equal tensors; a file that does not fit, or a
pickle holding Python objects, is one line and exit 1. Weights are written here from randomly
initialised models; the ViT is shrunk (VIT_SHAPES) so everything runs in seconds on a CPU."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.vision_transformer import VisionTransformer

from mcscale.cli import main
from mcscale.models import backbones
from mcscale.models.pretrained import encoder_from_arch, read_weights

TINY_VIT = {"patch_size": 8, "num_layers": 3, "num_heads": 2, "hidden_dim": 24, "mlp_dim": 40}


@pytest.fixture
def tiny_vit(monkeypatch):
    """vit_b_16 shrunk to 3 blocks of width 24 with 8-pixel patches, for this test."""
    monkeypatch.setitem(backbones.VIT_SHAPES, "vit_b_16", TINY_VIT)
    return TINY_VIT


def random_vit(image_size: int = 16, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    net = VisionTransformer(image_size=image_size, **TINY_VIT)
    with torch.no_grad():  # torchvision zeroes some tensors at init: make every one distinctive
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def to_dino_names(state: dict) -> dict:
    """torchvision ViT names -> the public DINO checkpoints' names (written from the two layouts' key
    lists, independently of the loader's mapping)."""
    block = {"ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj",
             "ln_2": "norm2", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    top = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed", "conv_proj": "patch_embed.proj",
           "encoder.ln": "norm", "heads.head": "head"}
    out = {}
    for key, value in state.items():
        found = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)$", key)
        if found:
            number, rest = found.groups()
            old = next(o for o in block if rest == o or rest.startswith(o + "."))
            out[f"blocks.{number}.{block[old]}{rest[len(old):]}"] = value
        else:
            old = next(o for o in top if key == o or key.startswith(o + "."))
            out[top[old] + key[len(old):]] = value
    return out


def config_arch(backbone: str, weights, image_size: int, in_channels: int = 3, trainable: str = "all") -> dict:
    return {"encoder": "config", "backbone": backbone, "weights": str(weights), "trainable": trainable,
            "adapter": "none", "in_channels": in_channels, "input_dim": 0, "image_size": image_size}


def assert_same_tensors(loaded: dict, source: dict, drop: tuple = ()) -> None:
    expected = {k: v for k, v in source.items() if not k.startswith(drop)}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_torchvision_resnet_state_dict_loads_into_equal_tensors(tmp_path, suffix):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for buffer in source.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)  # running statistics that differ from a fresh model's
    state = source.state_dict()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    encoder, dim = encoder_from_arch(config_arch("resnet18", path, 32), load=True)
    assert dim == 512
    assert_same_tensors(encoder.body.state_dict(), state, drop=("fc.",))  # the classifier is dropped
    assert read_weights(path).keys() == state.keys()


def test_a_dino_vit_checkpoint_maps_onto_torchvision(tmp_path, tiny_vit):
    source = random_vit()
    state = source.state_dict()
    dino = to_dino_names(state)
    assert "blocks.2.attn.qkv.weight" in dino and "pos_embed" in dino and "norm.bias" in dino
    path = tmp_path / "dino_tiny.pth"
    torch.save(dino, path)
    encoder, dim = encoder_from_arch(config_arch("vit_b_16", path, 16), load=True)
    assert dim == TINY_VIT["hidden_dim"]
    assert_same_tensors(encoder.body.state_dict(), state, drop=("heads.",))
    source.heads = torch.nn.Identity()
    x = torch.randn(3, 3, 16, 16)
    encoder.eval(), source.eval()
    assert torch.equal(encoder(x), source(x))  # the class token after the final LayerNorm, as DINO's output

    # DINO's full training checkpoint: the teacher under "teacher", names under "backbone."
    wrapped = tmp_path / "dino_full.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in dino.items()}, "epoch": 100}, wrapped)
    again, _ = encoder_from_arch(config_arch("vit_b_16", wrapped, 16), load=True)
    assert_same_tensors(again.body.state_dict(), state, drop=("heads.",))


def test_the_position_grid_follows_the_view_size(tmp_path, tiny_vit):
    """Weights trained at 16 px (2x2 patches) on 32 px views (4x4): the grid is resized, the class
    token's position kept."""
    state = random_vit(image_size=16).state_dict()
    path = tmp_path / "vit.pt"
    torch.save(state, path)
    encoder, _ = encoder_from_arch(config_arch("vit_b_16", path, 32), load=True)
    pos = encoder.body.state_dict()["encoder.pos_embedding"]
    assert pos.shape == (1, 17, 24)
    assert torch.equal(pos[:, 0], state["encoder.pos_embedding"][:, 0])


def _cluster_with_weights(tmp_path, weights, *extra):
    return main(["cluster", "--config", "digits_lt", "--cpu", "--out", str(tmp_path / "run"),
                 "model.backbone=vit_b_16", f"model.weights={weights}", "data.image_size=16", "--max-steps", "1",
                 "logging.report=false", *extra])


def test_a_weights_file_with_a_missing_key_is_one_line(tmp_path, capsys, tiny_vit):
    state = random_vit().state_dict()
    del state["encoder.layers.encoder_layer_1.ln_2.weight"]
    state["extra.thing"] = torch.zeros(2)
    path = tmp_path / "short.pt"
    torch.save(state, path)
    assert _cluster_with_weights(tmp_path, path) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mcscale: error: model.weights: {path} does not fit model.backbone=vit_b_16: ")
    assert "missing keys: encoder.layers.encoder_layer_1.ln_2.weight" in err and "unexpected keys: extra.thing" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


class Payload:
    """Would leave a file behind if unpickling ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_weights_file_is_refused_without_running_it(tmp_path, capsys, tiny_vit):
    marker = tmp_path / "ran"
    path = tmp_path / "pickled.pt"
    torch.save({"conv_proj.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    assert _cluster_with_weights(tmp_path, path) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused to load" in err and str(path) in err, err
    assert not marker.exists()

    code = main(["embed", "--config", "digits_lt", "--cpu", "--out", str(tmp_path / "emb"), "model.backbone=vit_b_16",
                 f"model.weights={path}", "data.image_size=16"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "refused to load" in err, err
    assert not marker.exists()


def test_a_safetensors_name_on_a_pickle_is_one_line(tmp_path, capsys, tiny_vit):
    path = tmp_path / "fake.safetensors"
    torch.save(random_vit().state_dict(), path)
    assert _cluster_with_weights(tmp_path, path) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable safetensors file" in err, err


@pytest.mark.parametrize("overrides,needle", [
    (["model.weights=x.pt"], "model.weights: small_cnn takes no weights file"),
    (["model.backbone=resnet18"], "cluster: no encoder: pass --encoder RUN"),
    (["model.trainable=last_block", "model.backbone=identity"], "model.trainable: last_block needs a backbone"),
    (["model.backbone=vit_b_16", "data.image_size=20", "model.weights=x.pt"], "data.image_size: 20 is not a multiple"),
])
def test_config_errors_before_any_work(tmp_path, capsys, overrides, needle):
    code = main(["cluster", "--config", "digits_lt", "--cpu", "--out", str(tmp_path / "o"), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_pretrained_weights_take_the_imagenet_preprocessing(tmp_path, tiny_vit):
    """224 px and the ImageNet mean / std by default; data.image_size overrides the size."""
    from mcscale.config import load_config
    from mcscale.data.loading import load_views

    cfg = load_config("digits_lt", ["model.backbone=resnet18", "model.weights=x.pt"])
    _, _, views = load_views(cfg, torch.device("cpu"))
    assert views.image_size == 224 and views.clean(torch.arange(2)).shape == (2, 1, 224, 224)
    assert views.normalizer.mean.tolist() == pytest.approx([(0.485 + 0.456 + 0.406) / 3])  # grey: one channel
    cfg = load_config("digits_lt", ["model.backbone=vit_b_16", "model.weights=x.pt", "data.image_size=32"])
    _, _, views = load_views(cfg, torch.device("cpu"))
    assert views.image_size == 32
