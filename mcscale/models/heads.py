"""The two-head clustering model (METHOD.md section 2): the target head (K clusters) and the auxiliary
head (M clusters) on the encoder's un-normalised output, initialised from K-means centres."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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
