"""Networks: backbones, BYOL pre-training (METHOD.md section 5) and the two-head clustering model.

The BYOL target network (backbone + projector) becomes the clustering encoder; ClusterModel puts the
target head (K clusters) and the auxiliary head (M clusters) on its un-normalised output and
initialises them from K-means centres (METHOD.md section 2).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch import Tensor

__all__ = [
    "BACKBONES",
    "build_backbone",
    "MLP",
    "BYOL",
    "byol_loss",
    "byol_momentum",
    "ClusterModel",
    "feature_dim_of",
]

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


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """mean_i (2 - 2 cos(prediction_i, target_i)), in [0, 4]; computed in float32 at least."""
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.float(), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


def byol_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """EMA rate rising from ``base`` at step 0 to 1 at ``total_steps`` on a cosine (BYOL paper)."""
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


class BYOL(nn.Module):
    """Online network (backbone + projector + predictor) and its EMA target (backbone + projector)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, hidden_dim: int = 4096, proj_dim: int = 512):
        super().__init__()
        self.online_backbone = backbone
        self.online_projector = MLP(feature_dim, hidden_dim, proj_dim)
        self.predictor = MLP(proj_dim, hidden_dim, proj_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self._target_parameters():
            p.requires_grad_(False)
        self.proj_dim = proj_dim

    # Online / target halves as parallel lists, in the same order, for the EMA.
    def _online_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.online_backbone, self.online_projector

    def _target_modules(self) -> tuple[nn.Module, nn.Module]:
        return self.target_backbone, self.target_projector

    def _online_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._online_modules() for p in m.parameters()]

    def _target_parameters(self) -> list[nn.Parameter]:
        return [p for m in self._target_modules() for p in m.parameters()]

    def online(self, x: Tensor) -> Tensor:
        """Online prediction q(g(f(x)))."""
        return self.predictor(self.online_projector(self.online_backbone(x)))

    def target(self, x: Tensor) -> Tensor:
        """Target projection g'(f'(x)), without gradient."""
        with torch.no_grad():
            return self.target_projector(self.target_backbone(x))

    def forward(self, view1: Tensor, view2: Tensor) -> Tensor:
        """Symmetric BYOL loss: byol_loss(q(v1), z'(v2)) + byol_loss(q(v2), z'(v1)), in [0, 8].

        Each view goes through the networks separately, so BatchNorm statistics are per view.
        """
        p1, p2 = self.online(view1), self.online(view2)
        z1, z2 = self.target(view1), self.target(view2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target = m * target + (1 - m) * online for parameters; buffers (BN statistics) copied."""
        target, online = self._target_parameters(), self._online_parameters()
        torch._foreach_mul_(target, momentum)
        torch._foreach_add_(target, online, alpha=1 - momentum)
        for mt, mo in zip(self._target_modules(), self._online_modules()):
            for bt, bo in zip(mt.buffers(), mo.buffers()):
                bt.copy_(bo)

    def encoder(self) -> nn.Module:
        """A trainable copy of the target network (backbone + projector): the clustering encoder."""
        enc = nn.Sequential(copy.deepcopy(self.target_backbone), copy.deepcopy(self.target_projector))
        for p in enc.parameters():
            p.requires_grad_(True)
        return enc

    def param_groups(
        self, lr: float, predictor_lr_mult: float = 10.0, weight_decay: float = 5e-4
    ) -> list[dict]:
        """Optimizer groups: online backbone + projector at lr, predictor at lr * predictor_lr_mult.

        Each group keeps its base lr under "base_lr" so a schedule can scale every group alike.
        """
        pred_lr = lr * predictor_lr_mult
        return [
            {"name": "online", "params": self._online_parameters(), "lr": lr, "base_lr": lr,
             "weight_decay": weight_decay},
            {"name": "predictor", "params": list(self.predictor.parameters()), "lr": pred_lr,
             "base_lr": pred_lr, "weight_decay": weight_decay},
        ]


# ---------------------------------------------------------------- clustering
class CosineLinear(nn.Linear):
    """Cosine classifier: scale * <f / |f|, w_k / |w_k|> (P2OT's optional head), no bias."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0):
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).T


class ClusterModel(nn.Module):
    """Encoder + target head (K clusters) + auxiliary head (M clusters): linear with bias on the
    un-normalised features, or cosine classifiers when ``cosine_scale`` is given."""

    def __init__(
        self, encoder: nn.Module, feature_dim: int, num_clusters: int, num_aux: int, cosine_scale: float | None = None
    ):
        super().__init__()
        self.encoder = encoder
        if cosine_scale is None:
            self.head_t = nn.Linear(feature_dim, num_clusters)
            self.head_m = nn.Linear(feature_dim, num_aux)
        else:
            self.head_t = CosineLinear(feature_dim, num_clusters, cosine_scale)
            self.head_m = CosineLinear(feature_dim, num_aux, cosine_scale)

    def features(self, x: Tensor) -> Tensor:
        """Un-normalised encoder output (L2-normalise it yourself for K-means)."""
        return self.encoder(x)

    def heads(self, f: Tensor) -> tuple[Tensor, Tensor]:
        return self.head_t(f), self.head_m(f)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.features(x))

    @torch.no_grad()
    def init_heads(self, centers_t: Tensor, centers_m: Tensor, scale: float = 100.0) -> None:
        """Head weight = scale * L2-normalised K-means centres, bias = 0 (METHOD.md section 2).

        A cosine head normalises its weights itself, so it takes the unit centres (its own scale applies).
        """
        for head, centers in ((self.head_t, centers_t), (self.head_m, centers_m)):
            if tuple(centers.shape) != tuple(head.weight.shape):
                raise ValueError(
                    f"init_heads: centres {tuple(centers.shape)} do not match head {tuple(head.weight.shape)}"
                )
            factor = 1.0 if isinstance(head, CosineLinear) else scale
            head.weight.copy_(factor * F.normalize(centers.float(), dim=1))  # copy_ casts dtype/device
            if head.bias is not None:
                head.bias.zero_()
