"""BatchNorm with the statistics of the GLOBAL batch under data parallelism (``distributed.sync_batchnorm``).

torch's SyncBatchNorm runs on CUDA only; this one works with gloo on CPU too. In training each layer
all-reduces one message per forward, [sum, sum of squares, count] per channel (float64), and the
backward pass all-reduces the gradient of those sums, so the gradient is that of the single-process
BatchNorm over the concatenated batch. In eval mode, or at world size 1, it is torch's BatchNorm.
Parameter and buffer names are those of nn.BatchNorm1d / 2d, so checkpoints move freely between
world sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mcscale.parallel import COMM, world_size


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the incoming gradient."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        COMM.record(out)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        COMM.record(grad)
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2D input, got {x.dim()}D")

    def forward(self, x):
        if not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        # local sums in the input's precision (float32 accumulation for half types), combined in float64
        xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
        local = torch.cat([
            xs.sum(dims).double(),
            (xs * xs).sum(dims).double(),
            torch.full((1,), float(x.numel() // channels), dtype=torch.float64, device=x.device),
        ])
        total = _SumOverRanks.apply(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        invstd = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count: torch.Tensor) -> None:
        """As torch's BatchNorm: unbiased variance; momentum None means a cumulative average. The
        count stays a tensor: reading it on the host would stall a GPU at every layer."""
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1.0).clamp_min(1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm1d / 2d / 3d replaced by a GlobalBatchNorm holding its state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        state = module.state_dict()
        if state:
            replacement.to(next(iter(state.values())).device).load_state_dict(state)
        return replacement.train(module.training)
    for name, child in module.named_children():
        converted = convert_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module

