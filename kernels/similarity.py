"""Similarity alignment L_s without the N x N matrices (METHOD.md section 4).

Write C = [A | B] (N x (K+M), the row-normalised probabilities of both heads side by side) and
s = (+1 on the K columns of A, -1 on the M columns of B). With G = C^T C and G' = (s s^T) * G,

    N^2 L_s = ||A^T A||^2 + ||B^T B||^2 - 2 ||A^T B||^2 = sum(G' * G),
    d(N^2 L_s)/dC = 4 C G'.

So one Gram kernel over the (K+M)^2 tiles gives the loss and stores G' for the backward, one
matmul kernel gives dC, and the chain rule through the row normalisation finishes the gradient.
Columns of C are read straight from A and B (two masked loads), never copied. All products and
sums run in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import accum_dtype, check_launchable, launch, split_f64, tl_dtype, warps_for

__all__ = ["similarity_alignment"]

_EPS = 1e-12  # F.normalize's eps: rows are divided by max(||row||, eps)


@triton.jit
def _inv_norm_kernel(
    a_ptr, b_ptr, inv_a_ptr, inv_b_ptr, n, num_a, width,
    stride_an, stride_ak, stride_bn, stride_bk,
    EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = rows < n
    rows64 = rows.to(tl.int64)
    sq_a = tl.zeros([BLOCK_N], dtype=ACC)
    sq_b = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, width, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        in_a = (cols < num_a)[None, :]
        live = row_live[:, None] & (cols < width)[None, :]
        x = tl.load(a_ptr + rows64[:, None] * stride_an + cols[None, :] * stride_ak,
                    mask=live & in_a, other=0.0).to(ACC)
        x += tl.load(b_ptr + rows64[:, None] * stride_bn + (cols - num_a)[None, :] * stride_bk,
                     mask=live & ~in_a, other=0.0).to(ACC)
        sq_a += tl.sum(tl.where(in_a, x * x, 0.0), axis=1)
        sq_b += tl.sum(tl.where(in_a, 0.0, x * x), axis=1)
    tl.store(inv_a_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sq_a), EPS), mask=row_live)
    tl.store(inv_b_ptr + rows, 1.0 / tl.maximum(tl.sqrt(sq_b), EPS), mask=row_live)


@triton.jit
def _gram_kernel(
    a_ptr, b_ptr, inv_a_ptr, inv_b_ptr, gram_ptr, loss_ptr, n, num_a, width, inv_n2_hi, inv_n2_lo,
    stride_an, stride_ak, stride_bn, stride_bk,
    NORMALIZE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile_p = tl.program_id(0)
    tile_q = tl.program_id(1)
    if tile_p > tile_q:  # G' is symmetric: the upper tile also writes its mirror
        return
    cols_p = tile_p * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_q = tile_q * BLOCK_C + tl.arange(0, BLOCK_C)
    in_a_p = (cols_p < num_a)[None, :]
    in_a_q = (cols_q < num_a)[None, :]
    live_p = (cols_p < width)[None, :]
    live_q = (cols_q < width)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=ACC)  # G[p, q] for this tile
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_live = (rows < n)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        xp = tl.load(a_ptr + rows64 * stride_an + cols_p[None, :] * stride_ak,
                     mask=row_live & live_p & in_a_p, other=0.0).to(ACC)
        xp += tl.load(b_ptr + rows64 * stride_bn + (cols_p - num_a)[None, :] * stride_bk,
                      mask=row_live & live_p & ~in_a_p, other=0.0).to(ACC)
        xq = tl.load(a_ptr + rows64 * stride_an + cols_q[None, :] * stride_ak,
                     mask=row_live & live_q & in_a_q, other=0.0).to(ACC)
        xq += tl.load(b_ptr + rows64 * stride_bn + (cols_q - num_a)[None, :] * stride_bk,
                      mask=row_live & live_q & ~in_a_q, other=0.0).to(ACC)
        if NORMALIZE:
            inv_a = tl.load(inv_a_ptr + rows, mask=rows < n, other=0.0)[:, None]
            inv_b = tl.load(inv_b_ptr + rows, mask=rows < n, other=0.0)[:, None]
            xp *= tl.where(in_a_p, inv_a, inv_b)
            xq *= tl.where(in_a_q, inv_a, inv_b)
        acc += tl.dot(tl.trans(xp), xq, input_precision=PRECISION, out_dtype=ACC)
    same_head = (cols_p < num_a)[:, None] == in_a_q
    signed = tl.where(same_head, acc, -acc)
    # Off-diagonal tiles stand for themselves and their mirror in the sum.
    mult = tl.where(tile_p == tile_q, 1.0, 2.0).to(ACC) * (tl.cast(inv_n2_hi, ACC) + tl.cast(inv_n2_lo, ACC))
    tl.atomic_add(loss_ptr, tl.sum(tl.sum(signed * acc, axis=1), axis=0) * mult)
    valid = (cols_p < width)[:, None] & live_q
    p64 = cols_p.to(tl.int64)[:, None] * width
    q64 = cols_q.to(tl.int64)[None, :] * width
    tl.store(gram_ptr + p64 + cols_q[None, :], signed, mask=valid)
    tl.store(gram_ptr + q64 + cols_p[:, None], signed, mask=valid)


@triton.jit
def _grad_kernel(
    a_ptr, b_ptr, inv_a_ptr, inv_b_ptr, gram_ptr, grad_out_ptr, out_a_ptr, out_b_ptr,
    n, num_a, width, scale_hi, scale_lo,
    stride_an, stride_ak, stride_bn, stride_bk, stride_oan, stride_oak, stride_obn, stride_obk,
    NORMALIZE: tl.constexpr, WHOLE_ROW: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """dC = scale * grad_out * C G' for a BLOCK_N x BLOCK_P tile.

    With WHOLE_ROW (the tile spans every column) the normalisation backward runs here and the
    gradients w.r.t. the raw inputs are written; otherwise dC goes to out_a/out_b (an fp32 scratch)
    and _normalize_backward_kernel finishes.
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = (rows < n)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    if NORMALIZE:
        inv_a = tl.load(inv_a_ptr + rows, mask=rows < n, other=0.0)[:, None]
        inv_b = tl.load(inv_b_ptr + rows, mask=rows < n, other=0.0)[:, None]
    cols_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_a_p = (cols_p < num_a)[None, :]
    live_p = row_live & (cols_p < width)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_P], dtype=ACC)
    for q0 in range(0, width, BLOCK_Q):
        cols_q = q0 + tl.arange(0, BLOCK_Q)
        in_a_q = (cols_q < num_a)[None, :]
        live_q = row_live & (cols_q < width)[None, :]
        xq = tl.load(a_ptr + rows64 * stride_an + cols_q[None, :] * stride_ak,
                     mask=live_q & in_a_q, other=0.0).to(ACC)
        xq += tl.load(b_ptr + rows64 * stride_bn + (cols_q - num_a)[None, :] * stride_bk,
                      mask=live_q & ~in_a_q, other=0.0).to(ACC)
        if NORMALIZE:
            xq *= tl.where(in_a_q, inv_a, inv_b)
        g_live = (cols_q < width)[:, None] & (cols_p < width)[None, :]
        g = tl.load(gram_ptr + cols_q.to(tl.int64)[:, None] * width + cols_p[None, :],
                    mask=g_live, other=0.0)
        acc += tl.dot(xq, g, input_precision=PRECISION, out_dtype=ACC)
    acc *= tl.load(grad_out_ptr).to(ACC) * (tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC))
    if NORMALIZE and WHOLE_ROW:
        x = tl.load(a_ptr + rows64 * stride_an + cols_p[None, :] * stride_ak,
                    mask=live_p & in_a_p, other=0.0).to(ACC)
        x += tl.load(b_ptr + rows64 * stride_bn + (cols_p - num_a)[None, :] * stride_bk,
                     mask=live_p & ~in_a_p, other=0.0).to(ACC)
        inv = tl.where(in_a_p, inv_a, inv_b)
        unit = x * inv
        dot_a = tl.sum(tl.where(in_a_p, unit * acc, 0.0), axis=1)[:, None]
        dot_b = tl.sum(tl.where(in_a_p, 0.0, unit * acc), axis=1)[:, None]
        # d(x / max(|x|, eps)) = (g - u (u.g)) / |x| above eps, g / eps below (the clamp is flat).
        # (Tested as |x| > 2 eps so fp32 rounding of 1/eps cannot matter; |x| <= 2e-12 never occurs
        # for probability rows.)
        above = tl.where(in_a_p, inv_a < 0.5 / EPS, inv_b < 0.5 / EPS)
        radial = tl.where(in_a_p, dot_a, dot_b)
        acc = inv * tl.where(above, acc - unit * radial, acc)
    tl.store(out_a_ptr + rows64 * stride_oan + cols_p[None, :] * stride_oak,
             acc.to(out_a_ptr.dtype.element_ty), mask=live_p & in_a_p)
    tl.store(out_b_ptr + rows64 * stride_obn + (cols_p - num_a)[None, :] * stride_obk,
             acc.to(out_b_ptr.dtype.element_ty), mask=live_p & ~in_a_p)


@triton.jit
def _normalize_backward_kernel(
    x_ptr, inv_ptr, grad_ptr, out_ptr, n, width,
    stride_xn, stride_xk, stride_gn, stride_on, stride_ok,
    ACC: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = (g - u (u.g)) / |x| with u = x / |x| (g / eps for rows with |x| <= eps), row by row."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_live = (rows < n)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    inv = tl.load(inv_ptr + rows, mask=rows < n, other=0.0)[:, None]
    radial = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, width, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        live = row_live & (cols < width)[None, :]
        x = tl.load(x_ptr + rows64 * stride_xn + cols[None, :] * stride_xk, mask=live, other=0.0)
        g = tl.load(grad_ptr + rows64 * stride_gn + cols[None, :], mask=live, other=0.0)
        radial += tl.sum(x.to(ACC) * inv * g, axis=1)
    above = inv < 0.5 / EPS
    radial = tl.where(above, radial[:, None], 0.0)
    for c0 in range(0, width, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        live = row_live & (cols < width)[None, :]
        x = tl.load(x_ptr + rows64 * stride_xn + cols[None, :] * stride_xk, mask=live, other=0.0)
        g = tl.load(grad_ptr + rows64 * stride_gn + cols[None, :], mask=live, other=0.0)
        out = inv * (g - x.to(ACC) * inv * radial)
        tl.store(out_ptr + rows64 * stride_on + cols[None, :] * stride_ok,
                 out.to(out_ptr.dtype.element_ty), mask=live)


def _launch_config(n: int, width: int) -> dict:
    """Tile sizes from the problem sizes (a small table; tl.dot needs every dim >= 16)."""
    block_c = min(64, max(16, triton.next_power_of_2(width)))
    block_n = 16 if n <= 16 else (32 if width > 64 else 64)
    whole_row = triton.next_power_of_2(width) <= 128
    block_p = max(16, triton.next_power_of_2(width)) if whole_row else 64
    return dict(block_c=block_c, block_n=block_n, whole_row=whole_row, block_p=block_p, block_q=32)


def _types(a: torch.Tensor, b: torch.Tensor):
    acc = accum_dtype(a, b)
    # fp32 inputs get exact fp32 products; 16-bit inputs already carry less than tf32's mantissa.
    sixteen = a.dtype in (torch.bfloat16, torch.float16) and b.dtype in (torch.bfloat16, torch.float16)
    precision = "tf32" if sixteen else "ieee"
    return acc, tl_dtype(acc), precision


class _SimilarityAlignment(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, normalize_rows):
        n, num_a = a.shape
        width = num_a + b.shape[1]
        acc_dtype, acc, precision = _types(a, b)
        cfg = _launch_config(n, width)
        inv_a = torch.empty(n, dtype=acc_dtype, device=a.device)
        inv_b = torch.empty(n, dtype=acc_dtype, device=a.device)
        gram = torch.empty(width, width, dtype=acc_dtype, device=a.device)  # receives G' (signed)
        loss = torch.zeros((), dtype=acc_dtype, device=a.device)
        strides = (a.stride(0), a.stride(1), b.stride(0), b.stride(1))
        if normalize_rows:
            block = min(64, triton.next_power_of_2(width))
            launch(
                _inv_norm_kernel, (triton.cdiv(n, 16),),
                a, b, inv_a, inv_b, n, num_a, width, *strides,
                EPS=_EPS, ACC=acc, BLOCK_N=16, BLOCK_C=block, num_warps=4,
            )
        tiles = triton.cdiv(width, cfg["block_c"])
        launch(
            _gram_kernel, (tiles, tiles),
            a, b, inv_a, inv_b, gram, loss, n, num_a, width, *split_f64(1.0 / float(n * n)), *strides,
            NORMALIZE=normalize_rows, ACC=acc, PRECISION=precision,
            BLOCK_N=cfg["block_n"], BLOCK_C=cfg["block_c"], num_warps=4,
        )
        ctx.save_for_backward(a, b, inv_a, inv_b, gram)
        ctx.normalize_rows = normalize_rows
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        a, b, inv_a, inv_b, gram = ctx.saved_tensors
        normalize = ctx.normalize_rows
        n, num_a = a.shape
        width = num_a + b.shape[1]
        acc_dtype, acc, precision = _types(a, b)
        cfg = _launch_config(n, width)
        direct = cfg["whole_row"] or not normalize
        grad_a = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        grad_b = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        # Without the in-kernel finish, dC goes to an fp32 scratch laid out like [A | B].
        scratch = None if direct else torch.empty(n, width, dtype=acc_dtype, device=a.device)
        out_a = grad_a if direct else scratch[:, :num_a]
        out_b = grad_b if direct else scratch[:, num_a:]
        block_p = cfg["block_p"]
        launch(
            _grad_kernel, (triton.cdiv(n, cfg["block_n"]), triton.cdiv(width, block_p)),
            a, b, inv_a, inv_b, gram, grad_out.contiguous(), out_a, out_b,
            n, num_a, width, *split_f64(4.0 / float(n * n)),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1),
            NORMALIZE=normalize, WHOLE_ROW=cfg["whole_row"], ACC=acc, PRECISION=precision, EPS=_EPS,
            BLOCK_N=cfg["block_n"], BLOCK_P=block_p, BLOCK_Q=cfg["block_q"],
            num_warps=warps_for(cfg["block_n"] * block_p),
        )
        if not direct:
            for x, inv, g, out in ((a, inv_a, out_a, grad_a), (b, inv_b, out_b, grad_b)):
                launch(
                    _normalize_backward_kernel, (triton.cdiv(n, 16),),
                    x, inv, g, out, n, x.shape[1], x.stride(0), x.stride(1), g.stride(0),
                    out.stride(0), out.stride(1),
                    ACC=acc, EPS=_EPS, BLOCK_N=16, BLOCK_C=min(256, triton.next_power_of_2(x.shape[1])), num_warps=4,
                )
        return grad_a, grad_b, None


def similarity_alignment(
    probs_t: torch.Tensor, probs_m: torch.Tensor, normalize_rows: bool = True
) -> torch.Tensor:
    """L_s = (1/N^2) sum_ij (S_t - S_m)^2, S = P P^T, computed from Gram matrices by Triton kernels.

    Same value and gradients as ``mcscale.objectives.similarity_alignment`` (rows L2-normalised
    first when ``normalize_rows``); the result is float32 (float64 for float64 inputs).
    """
    if probs_t.dim() != 2 or probs_m.dim() != 2 or probs_t.shape[0] != probs_m.shape[0]:
        raise ValueError("similarity_alignment: both heads need 2-D inputs with the same number of rows")
    if probs_t.shape[0] == 0:
        raise ValueError("similarity_alignment: empty batch")
    check_launchable("similarity_alignment", probs_t, probs_m)
    return _SimilarityAlignment.apply(probs_t, probs_m, bool(normalize_rows))
