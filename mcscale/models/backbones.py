"""Backbones: torchvision ResNet-18 / 50 (optionally with the CIFAR stem), torchvision ViT-B/16, a small
CNN for tiny images, an MLP for precomputed embeddings, and identity (the input itself, flattened);
each maps a batch to (N, feature_dim) features. Weights files: mcscale.models.pretrained."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor

BACKBONES = ("resnet18", "resnet50", "vit_b_16", "small_cnn", "mlp", "identity")

# torchvision's ViT-B/16 shape; tests shrink it through this table (the weights' mapping is shape-free)
VIT_SHAPES = {"vit_b_16": {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}}
INPUT_SIDE = 32  # identity / the raw-input baseline: images larger than this per side are average-pooled


# ---------------------------------------------------------------- backbones
def _stem_conv(in_channels: int, cifar_stem: bool) -> nn.Conv2d:
    """ResNet's first conv: 3x3 stride 1 for small (CIFAR-sized) images, else the ImageNet 7x7 stride 2."""
    conv = (
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if cifar_stem
        else nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    )
    # Same initialisation torchvision gives its own convs.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet(name: str, in_channels: int, cifar_stem: bool) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    if cifar_stem or in_channels != 3:
        net.conv1 = _stem_conv(in_channels, cifar_stem)
    if cifar_stem:
        net.maxpool = nn.Identity()  # a 32x32 image cannot afford another factor 2 of down-sampling
    return net, feature_dim


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _small_cnn(in_channels: int) -> tuple[nn.Module, int]:
    """For tiny inputs (8x8 digits, 28x28 MNIST): one 2x down-sampling only, then global average pool.

    Narrow on purpose: the quickstart trains it on two CPU cores in a few minutes."""
    net = nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, 128


def _feature_mlp(input_dim: int) -> tuple[nn.Module, int]:
    """For precomputed embeddings: two Linear-BN-ReLU layers (no Linear bias: BatchNorm removes it)."""
    net = nn.Sequential(
        nn.Linear(input_dim, 1024, bias=False),
        nn.BatchNorm1d(1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, 512, bias=False),
        nn.BatchNorm1d(512),
        nn.ReLU(inplace=True),
    )
    return net, 512


def flatten_input(x: Tensor) -> Tensor:
    """The input as a feature vector: embeddings as they are, images flattened after average-pooling
    to at most INPUT_SIDE pixels a side (a 224 px image would need 150k dimensions a sample)."""
    if x.dim() == 4 and max(x.shape[-2:]) > INPUT_SIDE:
        x = F.adaptive_avg_pool2d(x, [min(side, INPUT_SIDE) for side in x.shape[-2:]])
    return x.flatten(1).float()


class FlattenInput(nn.Module):
    """The identity backbone: ``flatten_input`` (no parameters)."""

    def forward(self, x: Tensor) -> Tensor:
        return flatten_input(x)


class ThreeChannels(nn.Module):
    """Grey (one-channel) images repeated to the three channels an ImageNet network expects."""

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class ResidualMLP(nn.Module):
    """x + W2 gelu(W1 x + b1) + b2 with W2, b2 = 0: exactly the identity map at initialisation, so the
    clustering stage starts from its input's features and training moves them from there."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def imagenet_resnet(name: str) -> tuple[nn.Module, int]:
    """torchvision's ResNet as its ImageNet weights expect it (7x7 stem, max-pool), classifier removed."""
    net = getattr(torchvision.models, name)(weights=None)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def vit(name: str, image_size: int) -> tuple[nn.Module, int]:
    """torchvision's VisionTransformer of ``name``'s shape at ``image_size`` (a multiple of the patch),
    classifier removed: the class token after the final LayerNorm."""
    from torchvision.models.vision_transformer import VisionTransformer

    shape = VIT_SHAPES[name]
    if image_size % shape["patch_size"]:
        raise ValueError(f"{name}: image size {image_size} is not a multiple of its {shape['patch_size']}-pixel patches")
    net = VisionTransformer(image_size=image_size, **shape)
    net.heads = nn.Identity()
    return net, shape["hidden_dim"]


def build_backbone(
    name: str, in_channels: int = 3, cifar_stem: bool = True, input_dim: int | None = None,
    image_size: int | None = None,
) -> tuple[nn.Module, int]:
    """(module, feature_dim): a backbone mapping a batch to (N, feature_dim) features."""
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, cifar_stem)
    if name in VIT_SHAPES:
        net, dim = vit(name, image_size or 224)
        return (nn.Sequential(ThreeChannels(), net) if in_channels == 1 else net), dim
    if name == "small_cnn":
        return _small_cnn(in_channels)
    if name == "mlp":
        if input_dim is None:
            raise ValueError("build_backbone('mlp') needs input_dim (the embedding dimension)")
        return _feature_mlp(input_dim)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


@torch.no_grad()
def feature_dim_of(module: nn.Module, example_input: Tensor) -> int:
    """Output width of ``module`` on ``example_input`` (one dummy forward in eval mode, mode restored)."""
    was_training = module.training
    module.eval()
    try:
        return int(module(example_input).flatten(1).shape[1])
    finally:
        module.train(was_training)


# ---------------------------------------------------------------- BYOL
class MLP(nn.Sequential):
    """Linear - BatchNorm1d - ReLU - Linear: the BYOL projector and predictor.

    The first Linear has no bias: the BatchNorm after it subtracts the batch mean, so a bias there has
    zero gradient and would only drift with round-off (and with the optimiser's own noise).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
