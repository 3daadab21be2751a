"""Cluster weights from a K x M contingency matrix (METHOD.md section 3) as Triton kernels.

mini: each column is normalised over K, and every share strictly above delta adds one to the count
c_k of its row; w_k = M / max(c_k, 0.5). One program per block of columns, two passes down the
columns (totals, then threshold), counts scattered with atomics, then an elementwise finish.
maxi: each row is normalised over M; one program per block of rows does both passes and writes
w_k = max(c_k, 0.5) directly. Shares are computed in float64 against a float64 delta, as the
reference does, so the strict threshold flips at exactly the same counts.

Both modes share one prologue: a "line" is a column (mini) or a row (maxi); ``_line_totals`` sums
lines and ``_shares_above`` thresholds their shares. The block helpers are also called by the fused
head objective (``fused.py``), which computes the weights inside its finishing program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import check_launchable, launch, scalar, warps_for

__all__ = ["class_weights"]

WEIGHT_MODES = ("mini", "maxi")


@triton.jit
def _line_totals(counts_ptr, line_offs, line_live, length, stride_a, BLOCK_L: tl.constexpr,
                 BLOCK_A: tl.constexpr):
    """Float64 totals of BLOCK_L lines; ``line_offs`` are their offsets, ``stride_a`` the step along."""
    totals = tl.zeros([BLOCK_L], dtype=tl.float64)
    for a0 in range(0, length, BLOCK_A):
        along = a0 + tl.arange(0, BLOCK_A)
        live = line_live[:, None] & (along < length)[None, :]
        ptrs = counts_ptr + line_offs[:, None] + along.to(tl.int64)[None, :] * stride_a
        totals += tl.sum(tl.load(ptrs, mask=live, other=0).to(tl.float64), axis=1)
    return totals


@triton.jit
def _shares_above(counts_ptr, line_offs, line_live, totals, a0, length, stride_a, delta,
                  BLOCK_A: tl.constexpr):
    """[lines, BLOCK_A] mask of the entries a0.. whose share of their line is strictly above delta."""
    along = a0 + tl.arange(0, BLOCK_A)
    live = line_live[:, None] & (along < length)[None, :]
    ptrs = counts_ptr + line_offs[:, None] + along.to(tl.int64)[None, :] * stride_a
    t = tl.load(ptrs, mask=live, other=0).to(tl.float64)
    # An empty line has share 0 everywhere (the reference divides by max(total, 1) where total > 0).
    nonempty = totals > 0
    denom = tl.where(nonempty, tl.maximum(totals, 1.0), 1.0)
    share = tl.where(nonempty[:, None], t / denom[:, None], 0.0)
    return (share > delta) & live


@triton.jit
def _mini_owned_block(counts_ptr, owned_ptr, delta, j0, num_target, num_aux, stride_k, stride_j,
                      BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr):
    """Columns j0..j0+BLOCK_J: add to owned[k] the columns where cluster k's share is above delta."""
    cols = j0 + tl.arange(0, BLOCK_J)
    col_live = cols < num_aux
    col_offs = cols.to(tl.int64) * stride_j
    totals = _line_totals(counts_ptr, col_offs, col_live, num_target, stride_k, BLOCK_J, BLOCK_K)
    for k0 in range(0, num_target, BLOCK_K):
        above = _shares_above(counts_ptr, col_offs, col_live, totals, k0, num_target, stride_k, delta, BLOCK_K)
        hits = tl.sum(above.to(tl.int32), axis=0)
        rows = k0 + tl.arange(0, BLOCK_K)
        tl.atomic_add(owned_ptr + rows, hits, mask=(rows < num_target) & (hits > 0))


@triton.jit
def _mini_weight_block(owned_ptr, weight_ptr, offs, num_target, num_aux):
    """w_k = M / max(c_k, 0.5) for the clusters ``offs``."""
    live = offs < num_target
    owned = tl.load(owned_ptr + offs, mask=live, other=0).to(tl.float32)
    # The reference's ``M / tensor`` is torch's reciprocal-then-multiply, each correctly rounded in
    # float32; div_rn because Triton's default float32 division is approximate.
    recip = tl.math.div_rn(owned * 0.0 + 1.0, tl.maximum(owned, 0.5))
    tl.store(weight_ptr + offs, recip * tl.cast(num_aux, tl.float32), mask=live)


@triton.jit
def _maxi_weight_block(counts_ptr, weight_ptr, delta, k0, num_target, num_aux, stride_k, stride_j,
                       BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr):
    """Rows k0..k0+BLOCK_K: w_k = max(#{j : share of row k above delta}, 0.5)."""
    rows = k0 + tl.arange(0, BLOCK_K)
    row_live = rows < num_target
    row_offs = rows.to(tl.int64) * stride_k
    totals = _line_totals(counts_ptr, row_offs, row_live, num_aux, stride_j, BLOCK_K, BLOCK_J)
    owned = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j0 in range(0, num_aux, BLOCK_J):
        above = _shares_above(counts_ptr, row_offs, row_live, totals, j0, num_aux, stride_j, delta, BLOCK_J)
        owned += tl.sum(above.to(tl.int32), axis=1)
    tl.store(weight_ptr + rows, tl.maximum(owned.to(tl.float32), 0.5), mask=row_live)


@triton.jit
def _mini_owned_kernel(
    counts_ptr, owned_ptr, delta_ptr, num_target, num_aux, stride_k, stride_j,
    BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    _mini_owned_block(counts_ptr, owned_ptr, tl.load(delta_ptr), tl.program_id(0) * BLOCK_J, num_target,
                      num_aux, stride_k, stride_j, BLOCK_K, BLOCK_J)


@triton.jit
def _mini_finish_kernel(owned_ptr, weight_ptr, num_target, num_aux, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _mini_weight_block(owned_ptr, weight_ptr, offs, num_target, num_aux)


@triton.jit
def _maxi_weights_kernel(
    counts_ptr, weight_ptr, delta_ptr, num_target, num_aux, stride_k, stride_j,
    BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    _maxi_weight_block(counts_ptr, weight_ptr, tl.load(delta_ptr), tl.program_id(0) * BLOCK_K, num_target,
                       num_aux, stride_k, stride_j, BLOCK_K, BLOCK_J)


def _tiles(num_lines: int, line_length: int) -> tuple[int, int]:
    """(lines per program, chunk along a line): 2-D tiles of at most 4096 counts."""
    chunk = min(triton.next_power_of_2(max(line_length, 1)), 256)
    lines = max(1, min(4096 // chunk, 64, triton.next_power_of_2(max(num_lines, 1))))
    return lines, chunk


def class_weights(counts: torch.Tensor, delta: float, mode: str = "mini") -> torch.Tensor:
    """Per-cluster float32 weights from a K x M contingency matrix; ``mcscale.objectives`` semantics."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"class_weights: mode must be one of {WEIGHT_MODES}, got {mode!r}")
    if counts.dim() != 2:
        raise ValueError(f"class_weights: counts must be K x M, got shape {tuple(counts.shape)}")
    check_launchable("class_weights", counts)
    counts = counts.detach()
    if counts.dtype == torch.bool:
        counts = counts.to(torch.int32)
    num_target, num_aux = counts.shape
    device = counts.device
    weights = torch.empty(num_target, dtype=torch.float32, device=device)
    if num_target == 0:
        return weights
    delta_t = scalar(delta, torch.float64, device)
    if mode == "maxi":
        rows, chunk = _tiles(num_target, num_aux)
        launch(
            _maxi_weights_kernel, (triton.cdiv(num_target, rows),),
            counts, weights, delta_t, num_target, num_aux, counts.stride(0), counts.stride(1),
            BLOCK_K=rows, BLOCK_J=chunk, num_warps=warps_for(rows * chunk),
        )
        return weights
    owned = torch.zeros(num_target, dtype=torch.int32, device=device)
    if num_aux > 0:
        cols, chunk = _tiles(num_aux, num_target)
        launch(
            _mini_owned_kernel, (triton.cdiv(num_aux, cols),),
            counts, owned, delta_t, num_target, num_aux, counts.stride(0), counts.stride(1),
            BLOCK_K=chunk, BLOCK_J=cols, num_warps=warps_for(cols * chunk),
        )
    block = min(triton.next_power_of_2(num_target), 1024)
    launch(_mini_finish_kernel, (triton.cdiv(num_target, block),), owned, weights, num_target, num_aux, BLOCK=block)
    return weights
