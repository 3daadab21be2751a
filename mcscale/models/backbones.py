"""Backbones: torchvision ResNet-18 / 50 (optionally with the CIFAR stem), a small CNN for tiny
images, and an MLP for precomputed embeddings; each maps a batch to (N, feature_dim) features."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision
from torch import Tensor

BACKBONES = ("resnet18", "resnet50", "small_cnn", "mlp")


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


def build_backbone(
    name: str, in_channels: int = 3, cifar_stem: bool = True, input_dim: int | None = None
) -> tuple[nn.Module, int]:
    """(module, feature_dim): a backbone mapping a batch to (N, feature_dim) features."""
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, cifar_stem)
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
