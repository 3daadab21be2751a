"""Contingency counts T[k, j] = #{i : a_i = k, b_i = j} with one atomic-add kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import check_launchable, launch

__all__ = ["contingency"]

_BLOCK = 1024  # labels per program: the kernel is a scatter, bound by atomics, not by tile shape


@triton.jit
def _contingency_kernel(
    a_ptr, b_ptr, counts_ptr, n, stride_a, stride_b, num_target, num_aux, cells, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    a = tl.load(a_ptr + offs * stride_a, mask=live, other=0).to(tl.int64)
    b = tl.load(b_ptr + offs * stride_b, mask=live, other=0).to(tl.int64)
    valid = (a >= 0) & (a < num_target) & (b >= 0) & (b < num_aux)
    # Out-of-range pairs land in one extra slot past the matrix (index ``cells``) for the host check.
    cell = tl.where(valid, a * num_aux + b, cells)
    tl.atomic_add(counts_ptr + cell, tl.full([BLOCK], 1, tl.int64), mask=live)


def contingency(
    target_labels: torch.Tensor, aux_labels: torch.Tensor, num_target: int, num_aux: int
) -> torch.Tensor:
    """T[k, j] = #{i : target_labels[i] = k and aux_labels[i] = j}, a (num_target, num_aux) LongTensor.

    Same contract as ``mcscale.objectives.contingency``, including the ValueError for a label outside
    the matrix (checking it reads one number back from the device).
    """
    if target_labels.shape != aux_labels.shape or target_labels.dim() != 1:
        raise ValueError(
            f"contingency: label vectors must be 1-D and equally long, got {tuple(target_labels.shape)}"
            f" and {tuple(aux_labels.shape)}"
        )
    if target_labels.is_floating_point() or aux_labels.is_floating_point():
        raise ValueError("contingency: labels must be integers")
    check_launchable("contingency", target_labels, aux_labels)
    cells = num_target * num_aux
    counts = torch.zeros(cells + 1, dtype=torch.long, device=target_labels.device)
    n = target_labels.shape[0]
    if n > 0:
        launch(
            _contingency_kernel, (triton.cdiv(n, _BLOCK),),
            target_labels, aux_labels, counts, n, target_labels.stride(0), aux_labels.stride(0),
            num_target, num_aux, cells, BLOCK=_BLOCK,
        )
        if int(counts[cells]) > 0:
            raise ValueError("contingency: a label is outside [0, num_target) x [0, num_aux)")
    return counts[:cells].view(num_target, num_aux)
