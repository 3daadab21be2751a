"""BYOL pre-training (METHOD.md section 5): online and target networks, the loss, the EMA schedule;
the target backbone + projector becomes the clustering encoder."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mcscale.models.backbones import MLP, build_backbone


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


def build_byol(arch: dict) -> BYOL:
    backbone, feature_dim = build_backbone(
        arch["backbone"],
        in_channels=arch["in_channels"] or 3,
        cifar_stem=arch["cifar_stem"],
        input_dim=arch["input_dim"] or None,
        image_size=arch.get("image_size") or None,
    )
    return BYOL(backbone, feature_dim, hidden_dim=arch["proj_hidden"], proj_dim=arch["proj_dim"])
