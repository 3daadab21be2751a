"""The whole MiniClustering / MaxiClustering head objective in three or four Triton launches per step.

One call computes what ``HeadGuided.batch_loss`` composes from the references (METHOD.md sections 3
and 4, the cross-entropy form of L_r): class weights from the contingency matrix of the argmaxes of
one view, L_r (confident, weighted CE of the target head), L_m (confident, optionally class-balanced
CE of the aux head), L_s (similarity alignment in Gram form) and L = L_r + alpha L_m + beta L_s,
forward and backward into the prediction-view logits of both heads. The pseudo-label view gets no
gradient.

Launches (counted by ``launch_count()``; nothing else runs on the device, no memset, once the first
call has cached tau and delta there):

1. ``_head_rows_kernel`` (one program per block of rows): softmax statistics of the four logit
   matrices, the count labels, pseudo-labels, per-row NLL, and C = [U_t | U_m] (the rows of both
   heads' probabilities, L2-normalised when ``normalize_rows``) written to a scratch. When K + M
   fits one tile (next power of two <= 128, the CIFAR / STL settings) each program also writes its
   partial Gram matrix C_blk^T C_blk.
2. wide path only (K + M > 128: Tiny-ImageNet, ImageNet-LT, where the partial Grams would not fit a
   program): ``_head_gram_kernel``, one program per tile of G; the upper ones compute G' = (s s^T) * G
   and their share of sum(G' * G).
3. ``_head_finish_kernel`` (one program): the contingency matrix (zeroed, then scattered with
   atomics), the class weights (the helpers of ``weights.py``), the per-class CE sums and
   coefficients (the helper of ``confident_ce.py``), G and G' from the partials (one-tile path),
   L_s = sum(G' * G) / N^2 and the total loss.
4. ``_head_grad_kernel`` (backward, one program per block of rows):
   dz = g * (coef[y] (p - onehot(y)) + beta * u * (D - r u)), D = (4 / N^2) C G', r = u . D per head
   (alpha is folded into the aux head's coef; without row normalisation u = p and the last term is
   D - r): the normalisation and softmax backwards collapse to this because d(p / |p|) is orthogonal
   to p.

So a step is 2 launches forward + 1 backward = 3 when K + M fits one tile, 3 + 1 = 4 on the wide path
(``LAUNCHES_PER_STEP``). The launches are plain stream-ordered kernels with no state kept between
calls, so a step can be captured in a CUDA graph. The finishing work is the serial part:
O(N + K M + partials), small for the paper's settings.

Host code: ``head_objective`` validates its arguments into one frozen ``HeadObjectiveOptions``, which
``_forward`` and ``_backward`` (called by the autograd function) take as they are.

Arithmetic is float32 (float64 for float64 logits) whatever the logits' dtype, with the
references' rules: softmax and confidence in the accumulation dtype, class weights from float64
shares, class-balanced factors in float32. The Gram products use exact fp32 (``ieee``), as the
references on the CPU do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._runtime import accum_dtype, check_launchable, launch, scalar, split_f64, tl_dtype, warps_for
from .confident_ce import _ce_coefficients
from .weights import _maxi_weight_block, _mini_owned_block, _mini_weight_block, _tiles

__all__ = ["head_objective", "HeadObjective", "HeadObjectiveOptions", "LAUNCHES_PER_STEP"]

WEIGHT_MODES = ("mini", "maxi")
WEIGHT_VIEWS = ("prediction", "pseudo")
NORMALIZATIONS = ("weight_sum", "count")
LAUNCHES_PER_STEP = {"fused": 3, "wide": 4}  # K + M <= SMALL_WIDTH after padding, and wider
_EPS = 1e-12  # F.normalize's eps

# Tile limits (module constants so tests can shrink them and exercise the multi-tile code paths
# at interpreter-friendly sizes).
SMALL_WIDTH = 128  # K + M, padded to a power of two, up to which Gram partials come from launch 1
                   # (the one-tile path); wider is the wide path
CHUNK = 128  # columns of one head per step in the row loops
GRAM_TILE = 64  # Gram tile side in the wide path
GRAD_TILE_P, GRAD_TILE_Q = 64, 32  # output columns per step / inner step of C G' in the wide path


# ---------------------------------------------------------------- launch 1: rows
@triton.jit
def _online_stats(z_ptr, stride_n, stride_k, rows64, row_live, width, ACC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row max, sum of exp(z - max) and first argmax of z, over the columns in chunks."""
    run_max = tl.full([BLOCK_R], -float("inf"), ACC)
    run_sum = tl.zeros([BLOCK_R], dtype=ACC)
    best = tl.full([BLOCK_R], -float("inf"), ACC)
    best_idx = tl.zeros([BLOCK_R], dtype=tl.int32)
    for h0 in range(0, width, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_live = (cols < width)[None, :]
        # Padding columns are -inf (no mass); padding rows read 0 so they stay finite.
        z = tl.load(z_ptr + rows64 * stride_n + cols[None, :] * stride_k, mask=row_live[:, None] & col_live,
                    other=0.0)
        z = tl.where(col_live, z.to(ACC), -float("inf"))
        chunk_max = tl.max(z, axis=1)
        chunk_idx = tl.argmax(z, axis=1) + h0  # first index on ties, like torch.argmax
        new_max = tl.maximum(run_max, chunk_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        take = chunk_max > best  # strict: an earlier chunk keeps a tie
        best_idx = tl.where(take, chunk_idx, best_idx)
        best = tl.where(take, chunk_max, best)
    return run_max, run_sum, best_idx


@triton.jit
def _head_rows(
    z1_ptr, s1n, s1k, z2_ptr, s2n, s2k, c_ptr, col0, c_stride, rows, row_live, width, tau,
    PRED_VIEW: tl.constexpr, NORMALIZE: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One head for a block of rows: (count label, pseudo-label or -1, NLL, |p|), and its columns of C."""
    rows64 = rows.to(tl.int64)[:, None]
    max1, sum1, arg1 = _online_stats(z1_ptr, s1n, s1k, rows64, row_live, width, ACC, BLOCK_R, BLOCK_H)
    max2, sum2, arg2 = _online_stats(z2_ptr, s2n, s2k, rows64, row_live, width, ACC, BLOCK_R, BLOCK_H)
    # Pseudo-label: first argmax of softmax(z2) (as the reference, which takes the max of the probs).
    conf = tl.full([BLOCK_R], -1.0, ACC)
    label = tl.zeros([BLOCK_R], dtype=tl.int32)
    for h0 in range(0, width, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_live = (cols < width)[None, :]
        z = tl.load(z2_ptr + rows64 * s2n + cols[None, :] * s2k, mask=row_live[:, None] & col_live, other=0.0)
        probs = tl.where(col_live, tl.exp(z.to(ACC) - max2[:, None]) / sum2[:, None], -1.0)
        chunk_conf = tl.max(probs, axis=1)
        chunk_idx = tl.argmax(probs, axis=1) + h0
        take = chunk_conf > conf
        label = tl.where(take, chunk_idx, label)
        conf = tl.where(take, chunk_conf, conf)
    selected = row_live & (conf > tau)
    # NLL at the pseudo-label and |p| of the prediction view.
    lse = max1 + tl.log(sum1)
    z_label = tl.zeros([BLOCK_R], dtype=ACC)
    squares = tl.zeros([BLOCK_R], dtype=ACC)
    for h0 in range(0, width, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        live = row_live[:, None] & (cols < width)[None, :]
        z = tl.load(z1_ptr + rows64 * s1n + cols[None, :] * s1k, mask=live, other=0.0).to(ACC)
        p = tl.where(live, tl.exp(z - max1[:, None]) / sum1[:, None], 0.0)
        squares += tl.sum(p * p, axis=1)
        z_label += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
    norm = tl.full([BLOCK_R], 1.0, ACC)
    if NORMALIZE:
        norm = tl.maximum(tl.sqrt(squares), EPS)
    for h0 in range(0, width, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        live = row_live[:, None] & (cols < width)[None, :]
        z = tl.load(z1_ptr + rows64 * s1n + cols[None, :] * s1k, mask=live, other=0.0).to(ACC)
        u = tl.exp(z - max1[:, None]) / sum1[:, None] / norm[:, None]
        tl.store(c_ptr + rows64 * c_stride + (col0 + cols)[None, :], u, mask=live)
    count_label = arg1 if PRED_VIEW else arg2
    nll = tl.where(selected, lse - z_label, 0.0)
    return count_label, tl.where(selected, label, -1), nll, norm


@triton.jit
def _head_rows_kernel(
    zt1_ptr, zm1_ptr, zt2_ptr, zm2_ptr, tau_ptr, c_ptr, labels_ptr, row_ptr, part_ptr,
    n, num_t, num_m,
    st1n, st1k, sm1n, sm1k, st2n, st2k, sm2n, sm2k,
    PRED_VIEW: tl.constexpr, NORMALIZE: tl.constexpr, SMALL: tl.constexpr, ACC: tl.constexpr,
    EPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """labels_ptr: int32 [4, n] (count label t, m; pseudo-label t, m); row_ptr: [4, n] (NLL t, m; |p| t, m)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_live = rows < n
    width = num_t + num_m
    tau = tl.load(tau_ptr)
    a, y_t, nll_t, norm_t = _head_rows(zt1_ptr, st1n, st1k, zt2_ptr, st2n, st2k, c_ptr, 0, width, rows,
                                       row_live, num_t, tau, PRED_VIEW, NORMALIZE, ACC, EPS, BLOCK_R, BLOCK_T)
    b, y_m, nll_m, norm_m = _head_rows(zm1_ptr, sm1n, sm1k, zm2_ptr, sm2n, sm2k, c_ptr, num_t, width, rows,
                                       row_live, num_m, tau, PRED_VIEW, NORMALIZE, ACC, EPS, BLOCK_R, BLOCK_M)
    tl.store(labels_ptr + rows, a, mask=row_live)
    tl.store(labels_ptr + n + rows, b, mask=row_live)
    tl.store(labels_ptr + 2 * n + rows, y_t, mask=row_live)
    tl.store(labels_ptr + 3 * n + rows, y_m, mask=row_live)
    tl.store(row_ptr + rows, nll_t, mask=row_live)
    tl.store(row_ptr + n + rows, nll_m, mask=row_live)
    tl.store(row_ptr + 2 * n + rows, norm_t, mask=row_live)
    tl.store(row_ptr + 3 * n + rows, norm_m, mask=row_live)
    if SMALL:  # this block's partial Gram matrix, from the rows of C just written
        tl.debug_barrier()
        cols = tl.arange(0, BLOCK_W)
        live = row_live[:, None] & (cols < width)[None, :]
        x = tl.load(c_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], mask=live, other=0.0)
        g = tl.dot(tl.trans(x), x, input_precision="ieee", out_dtype=ACC)
        w64 = tl.arange(0, BLOCK_W).to(tl.int64)
        tl.store(part_ptr + pid.to(tl.int64) * BLOCK_W * BLOCK_W + w64[:, None] * BLOCK_W + w64[None, :], g)


# ---------------------------------------------------------------- the finishing work (one program)
@triton.jit
def _head_finish_kernel(
    labels_ptr, row_ptr, counts_ptr, owned_ptr, weight_ptr, delta_ptr, class_ptr,
    part_ptr, num_parts, gram_ptr, stats_ptr, loss_ptr,
    n, num_t, num_m, inv_n2_hi, inv_n2_lo, alpha_hi, alpha_lo, beta_hi, beta_lo,
    MINI: tl.constexpr, SMALL: tl.constexpr, BY_WEIGHT: tl.constexpr, BALANCE: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_CLS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Launch 2 (3 on the wide path), one program: counts, weights, CE coefficients, L_s and the loss.

    class_ptr: [count_t (K), nll_t (K), count_m (M), nll_m (M) | coef_t (K), coef_m (M)];
    stats: l_r, l_m, l_s, |S_t|, |S_m|. part_ptr: per-row-block partial Grams (SMALL) or per-Gram-tile
    shares of sum(G' * G).
    """
    width = num_t + num_m
    sums_ptr = class_ptr
    coef_t_ptr = class_ptr + 2 * width
    coef_m_ptr = coef_t_ptr + num_t
    cells = num_t * num_m
    # Zero what the atomics below add into (this program owns all of it: no memset launch).
    for c0 in range(0, cells, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        tl.store(counts_ptr + offs, tl.zeros([BLOCK], dtype=tl.int64), mask=offs < cells)
    for c0 in range(0, 2 * width, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        tl.store(sums_ptr + offs, tl.zeros([BLOCK], dtype=ACC), mask=offs < 2 * width)
    for c0 in range(0, num_t, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        tl.store(owned_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32), mask=offs < num_t)
    tl.debug_barrier()
    # Contingency counts and the per-class CE sums, scattered row by row.
    ones = tl.full([BLOCK], 1, tl.int64)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        live = offs < n
        a = tl.load(labels_ptr + offs, mask=live, other=0).to(tl.int64)
        b = tl.load(labels_ptr + n + offs, mask=live, other=0).to(tl.int64)
        tl.atomic_add(counts_ptr + a * num_m + b, ones, mask=live)
        y_t = tl.load(labels_ptr + 2 * n + offs, mask=live, other=-1)
        y_m = tl.load(labels_ptr + 3 * n + offs, mask=live, other=-1)
        nll_t = tl.load(row_ptr + offs, mask=live, other=0.0)
        nll_m = tl.load(row_ptr + n + offs, mask=live, other=0.0)
        sel_t = y_t >= 0
        sel_m = y_m >= 0
        y_t = tl.maximum(y_t, 0)
        y_m = tl.maximum(y_m, 0)
        tl.atomic_add(sums_ptr + y_t, tl.full([BLOCK], 1.0, ACC), mask=sel_t)
        tl.atomic_add(sums_ptr + num_t + y_t, nll_t, mask=sel_t)
        tl.atomic_add(sums_ptr + 2 * num_t + y_m, tl.full([BLOCK], 1.0, ACC), mask=sel_m)
        tl.atomic_add(sums_ptr + 2 * num_t + num_m + y_m, nll_m, mask=sel_m)
    tl.debug_barrier()
    # Class weights (METHOD section 3), with the same block functions as class_weights.
    delta = tl.load(delta_ptr)
    if MINI:
        for j0 in range(0, num_m, BLOCK_J):
            _mini_owned_block(counts_ptr, owned_ptr, delta, j0, num_t, num_m, num_m, 1, BLOCK_K, BLOCK_J)
        tl.debug_barrier()
        for k0 in range(0, num_t, BLOCK_CLS):
            _mini_weight_block(owned_ptr, weight_ptr, k0 + tl.arange(0, BLOCK_CLS), num_t, num_m)
    else:
        for k0 in range(0, num_t, BLOCK_K):
            _maxi_weight_block(counts_ptr, weight_ptr, delta, k0, num_t, num_m, num_m, 1, BLOCK_K, BLOCK_J)
    tl.debug_barrier()
    # L_r (weighted by w) and L_m (class-balanced or plain), with per-class gradient coefficients.
    l_r, n_t = _ce_coefficients(sums_ptr, sums_ptr + num_t, weight_ptr, coef_t_ptr, num_t,
                                True, False, BY_WEIGHT, ACC, BLOCK_CLS)
    l_m, n_m = _ce_coefficients(sums_ptr + 2 * num_t, sums_ptr + 2 * num_t + num_m, weight_ptr, coef_m_ptr,
                                num_m, False, BALANCE, True, ACC, BLOCK_CLS)
    # L_s = sum(G' * G) / N^2.
    inv_n2 = tl.cast(inv_n2_hi, ACC) + tl.cast(inv_n2_lo, ACC)
    if SMALL:
        w_cols = tl.arange(0, BLOCK_W)
        tile = w_cols.to(tl.int64)[:, None] * BLOCK_W + w_cols[None, :]
        gram = tl.zeros([BLOCK_W, BLOCK_W], dtype=ACC)
        for p in range(0, num_parts):
            gram += tl.load(part_ptr + p * BLOCK_W * BLOCK_W + tile)
        signed = tl.where((w_cols < num_t)[:, None] == (w_cols < num_t)[None, :], gram, -gram)
        l_s = tl.sum(tl.sum(signed * gram, axis=1), axis=0) * inv_n2
        valid = (w_cols < width)[:, None] & (w_cols < width)[None, :]
        tl.store(gram_ptr + w_cols.to(tl.int64)[:, None] * width + w_cols[None, :], signed, mask=valid)
    else:
        total = tl.zeros([BLOCK_P], dtype=ACC)
        for p0 in range(0, num_parts, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            total += tl.load(part_ptr + offs, mask=offs < num_parts, other=0.0)
        l_s = tl.sum(total, axis=0) * inv_n2
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC)
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    tl.store(loss_ptr, l_r + alpha * l_m + beta * l_s)
    tl.store(stats_ptr, l_r)
    tl.store(stats_ptr + 1, l_m)
    tl.store(stats_ptr + 2, l_s)
    tl.store(stats_ptr + 3, n_t)
    tl.store(stats_ptr + 4, n_m)


# ---------------------------------------------------------------- wide path: the Gram tiles
@triton.jit
def _head_gram_kernel(
    c_ptr, gram_ptr, part_ptr, n, num_t, width,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Launch 2 of the wide path: one upper tile (p <= q) of G' = (s s^T) * C^T C, mirrored, and its
    share of sum(G' * G) to part[p, q] (0 from the lower tiles, which their mirror stands for)."""
    tile_p = tl.program_id(0)
    tile_q = tl.program_id(1)
    slot = tile_p * tl.num_programs(1) + tile_q
    if tile_p > tile_q:
        tl.store(part_ptr + slot + tl.arange(0, 1), tl.zeros([1], dtype=ACC))
        return
    cols_p = tile_p * BLOCK_C + tl.arange(0, BLOCK_C)
    cols_q = tile_q * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK_C], dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)[:, None] * width
        row_live = (rows < n)[:, None]
        xp = tl.load(c_ptr + rows64 + cols_p[None, :], mask=row_live & (cols_p < width)[None, :], other=0.0)
        xq = tl.load(c_ptr + rows64 + cols_q[None, :], mask=row_live & (cols_q < width)[None, :], other=0.0)
        acc += tl.dot(tl.trans(xp), xq, input_precision="ieee", out_dtype=ACC)
    signed = tl.where((cols_p < num_t)[:, None] == (cols_q < num_t)[None, :], acc, -acc)
    mult = tl.where(tile_p == tile_q, 1.0, 2.0).to(ACC)  # an off-diagonal tile stands for its mirror too
    tl.store(part_ptr + slot, tl.sum(tl.sum(signed * acc, axis=1), axis=0) * mult)
    valid = (cols_p < width)[:, None] & (cols_q < width)[None, :]
    tl.store(gram_ptr + cols_p.to(tl.int64)[:, None] * width + cols_q[None, :], signed, mask=valid)
    tl.store(gram_ptr + cols_q.to(tl.int64)[None, :] * width + cols_p[:, None], signed, mask=valid)


# ---------------------------------------------------------------- backward
@triton.jit
def _c_times_gram(c_ptr, gram_ptr, rows64, row_live, p0, width, ACC: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(C G')[rows, p0:p0+BLOCK_P], summed over BLOCK_Q columns of C at a time."""
    cols_p = p0 + tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_R, BLOCK_P], dtype=ACC)
    for q0 in range(0, width, BLOCK_Q):
        cols_q = q0 + tl.arange(0, BLOCK_Q)
        x = tl.load(c_ptr + rows64 * width + cols_q[None, :], mask=row_live & (cols_q < width)[None, :],
                    other=0.0)
        g = tl.load(gram_ptr + cols_q.to(tl.int64)[:, None] * width + cols_p[None, :],
                    mask=(cols_q < width)[:, None] & (cols_p < width)[None, :], other=0.0)
        acc += tl.dot(x, g, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _grad_store(
    u, d, cols, rows64, live, num_t, r_t, r_m, norm_t, norm_m, y_t, y_m, coef_t, coef_m, g, beta,
    gt_ptr, gtn, gtk, gm_ptr, gmn, gmk, NORMALIZE: tl.constexpr,
):
    """dz for a chunk of columns of [t | m] from C (u), D = dL_s/dC and the row quantities."""
    in_t = (cols < num_t)[None, :]
    r = tl.where(in_t, r_t[:, None], r_m[:, None])
    if NORMALIZE:
        p = u * tl.where(in_t, norm_t[:, None], norm_m[:, None])
        ls = u * (d - r * u)
    else:
        p = u
        ls = u * (d - r)
    label = tl.where(in_t, y_t[:, None], y_m[:, None])
    local = tl.where(in_t, cols[None, :], cols[None, :] - num_t)
    coef = tl.where(in_t, coef_t[:, None], coef_m[:, None])
    ce = coef * (p - (local == label).to(p.dtype))
    grad = g * (ce + beta * ls)
    tl.store(gt_ptr + rows64 * gtn + cols[None, :] * gtk, grad.to(gt_ptr.dtype.element_ty), mask=live & in_t)
    tl.store(gm_ptr + rows64 * gmn + (cols[None, :] - num_t) * gmk, grad.to(gm_ptr.dtype.element_ty),
             mask=live & ~in_t)


@triton.jit
def _head_grad_kernel(
    c_ptr, gram_ptr, labels_ptr, row_ptr, class_ptr, grad_out_ptr, d_ptr, gt_ptr, gm_ptr,
    n, num_t, width, scale_hi, scale_lo, alpha_hi, alpha_lo, beta_hi, beta_lo,
    gtn, gtk, gmn, gmk,
    NORMALIZE: tl.constexpr, WHOLE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """The backward launch: dz of both heads for a block of rows (class_ptr as in _head_finish_kernel)."""
    coef_t_ptr = class_ptr + 2 * width
    coef_m_ptr = coef_t_ptr + num_t
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_live = rows < n
    rows64 = rows.to(tl.int64)[:, None]
    y_t = tl.load(labels_ptr + 2 * n + rows, mask=row_live, other=-1)
    y_m = tl.load(labels_ptr + 3 * n + rows, mask=row_live, other=-1)
    norm_t = tl.load(row_ptr + 2 * n + rows, mask=row_live, other=1.0)
    norm_m = tl.load(row_ptr + 3 * n + rows, mask=row_live, other=1.0)
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC)
    beta = tl.cast(beta_hi, ACC) + tl.cast(beta_lo, ACC)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    coef_t = tl.load(coef_t_ptr + tl.maximum(y_t, 0), mask=y_t >= 0, other=0.0)
    coef_m = alpha * tl.load(coef_m_ptr + tl.maximum(y_m, 0), mask=y_m >= 0, other=0.0)
    g = tl.load(grad_out_ptr).to(ACC)
    if WHOLE:  # one tile holds whole rows: D stays in registers
        cols = tl.arange(0, BLOCK_P)
        live = row_live[:, None] & (cols < width)[None, :]
        u = tl.load(c_ptr + rows64 * width + cols[None, :], mask=live, other=0.0)
        d = scale * _c_times_gram(c_ptr, gram_ptr, rows64, row_live[:, None], 0, width, ACC,
                                  BLOCK_R, BLOCK_P, BLOCK_Q)
        in_t = (cols < num_t)[None, :]
        r_t = tl.sum(tl.where(in_t, u * d, 0.0), axis=1)
        r_m = tl.sum(tl.where(in_t, 0.0, u * d), axis=1)
        _grad_store(u, d, cols, rows64, live, num_t, r_t, r_m, norm_t, norm_m, y_t, y_m, coef_t, coef_m, g,
                    beta, gt_ptr, gtn, gtk, gm_ptr, gmn, gmk, NORMALIZE)
    else:  # D to a scratch in column chunks with the row dots, then the gradient from it
        r_t = tl.zeros([BLOCK_R], dtype=ACC)
        r_m = tl.zeros([BLOCK_R], dtype=ACC)
        for p0 in range(0, width, BLOCK_P):
            cols = p0 + tl.arange(0, BLOCK_P)
            live = row_live[:, None] & (cols < width)[None, :]
            u = tl.load(c_ptr + rows64 * width + cols[None, :], mask=live, other=0.0)
            d = scale * _c_times_gram(c_ptr, gram_ptr, rows64, row_live[:, None], p0, width, ACC,
                                      BLOCK_R, BLOCK_P, BLOCK_Q)
            tl.store(d_ptr + rows64 * width + cols[None, :], d, mask=live)
            in_t = (cols < num_t)[None, :]
            r_t += tl.sum(tl.where(in_t, u * d, 0.0), axis=1)
            r_m += tl.sum(tl.where(in_t, 0.0, u * d), axis=1)
        tl.debug_barrier()  # D is read back by other threads
        for p0 in range(0, width, BLOCK_P):
            cols = p0 + tl.arange(0, BLOCK_P)
            live = row_live[:, None] & (cols < width)[None, :]
            u = tl.load(c_ptr + rows64 * width + cols[None, :], mask=live, other=0.0)
            d = tl.load(d_ptr + rows64 * width + cols[None, :], mask=live, other=0.0)
            _grad_store(u, d, cols, rows64, live, num_t, r_t, r_m, norm_t, norm_m, y_t, y_m, coef_t, coef_m,
                        g, beta, gt_ptr, gtn, gtk, gm_ptr, gmn, gmk, NORMALIZE)


# ---------------------------------------------------------------- host side
@dataclass(frozen=True)
class HeadObjectiveOptions:
    """Everything a fused step depends on besides the logits; checked and normalised when built.

    ``mode`` "mini" (M > K) or "maxi"; class weights from the argmaxes of view ``weight_view``
    ("prediction": x1, the authors' code; "pseudo": x2, the paper); L_r normalised by
    ``target_normalize``; L_m class-balanced when ``aux_balance``; cosine similarities in L_s when
    ``normalize_rows``.
    """

    tau: float
    delta: float
    alpha: float
    beta: float
    mode: str = "mini"
    weight_view: str = "prediction"
    target_normalize: str = "weight_sum"
    aux_balance: bool = True
    normalize_rows: bool = True

    def __post_init__(self):
        if self.mode not in WEIGHT_MODES:
            raise ValueError(f"head_objective: mode must be one of {WEIGHT_MODES}, got {self.mode!r}")
        if self.weight_view not in WEIGHT_VIEWS:
            raise ValueError(f"head_objective: weight_view must be one of {WEIGHT_VIEWS}, got {self.weight_view!r}")
        if self.target_normalize not in NORMALIZATIONS:
            raise ValueError(f"head_objective: target_normalize must be one of {NORMALIZATIONS}")
        for name in ("tau", "delta", "alpha", "beta"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("aux_balance", "normalize_rows"):
            object.__setattr__(self, name, bool(getattr(self, name)))


def _gram_block(width: int) -> int:
    """Side of the one tile that holds G when K + M fits (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(width))


def _one_tile(width: int) -> bool:
    """Whether launch 1 writes partial Grams (no Gram-tile launch): K + M, padded, <= SMALL_WIDTH."""
    return _gram_block(width) <= SMALL_WIDTH


def _forward(zt1, zm1, zt2, zm2, opts: HeadObjectiveOptions):
    """The forward launches. Returns (loss, stats, weights, counts) and the tensors ``_backward`` takes:
    C, G', the labels, the per-row and the per-class scratch."""
    n, num_t = zt1.shape
    num_m = zm1.shape[1]
    width = num_t + num_m
    device = zt1.device
    acc_dtype = accum_dtype(zt1, zm1, zt2, zm2)
    acc = tl_dtype(acc_dtype)
    block_w = _gram_block(width)
    one_tile = _one_tile(width)
    gram_tiles = triton.cdiv(width, GRAM_TILE)
    # Launch 1's tiles: head chunks, and rows per program for tiles of about 4096 values (fewer
    # partial Grams when they are big).
    block_t = min(triton.next_power_of_2(num_t), CHUNK)
    block_m = min(triton.next_power_of_2(num_m), CHUNK)
    widest = max(block_t, block_m, block_w if one_tile else 0)
    block_r = max(16, min(4096 // widest, 128 if block_w <= 64 else 64, triton.next_power_of_2(n)))
    row_programs = triton.cdiv(n, block_r)
    num_parts = row_programs if one_tile else gram_tiles * gram_tiles

    # Outputs, then scratch (never zeroed on the host: the kernels write everything they read).
    loss = torch.empty((), dtype=acc_dtype, device=device)
    stats = torch.empty(5, dtype=acc_dtype, device=device)
    weights = torch.empty(num_t, dtype=torch.float32, device=device)
    counts = torch.empty(num_t, num_m, dtype=torch.long, device=device)
    c = torch.empty(n, width, dtype=acc_dtype, device=device)
    gram = torch.empty(width, width, dtype=acc_dtype, device=device)
    labels = torch.empty(4, n, dtype=torch.int32, device=device)
    per_row = torch.empty(4, n, dtype=acc_dtype, device=device)
    per_class = torch.empty(3 * width, dtype=acc_dtype, device=device)  # sums (2 K + 2 M), coef (K + M)
    owned = torch.empty(num_t, dtype=torch.int32, device=device)
    part = torch.empty(num_parts * (block_w * block_w if one_tile else 1), dtype=acc_dtype, device=device)

    launch(
        _head_rows_kernel, (row_programs,),
        zt1_ptr=zt1, zm1_ptr=zm1, zt2_ptr=zt2, zm2_ptr=zm2, tau_ptr=scalar(opts.tau, acc_dtype, device),
        c_ptr=c, labels_ptr=labels, row_ptr=per_row, part_ptr=part, n=n, num_t=num_t, num_m=num_m,
        st1n=zt1.stride(0), st1k=zt1.stride(1), sm1n=zm1.stride(0), sm1k=zm1.stride(1),
        st2n=zt2.stride(0), st2k=zt2.stride(1), sm2n=zm2.stride(0), sm2k=zm2.stride(1),
        PRED_VIEW=opts.weight_view == "prediction", NORMALIZE=opts.normalize_rows, SMALL=one_tile, ACC=acc,
        EPS=_EPS, BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_W=block_w,
        num_warps=warps_for(block_r * widest),
    )
    if not one_tile:
        launch(
            _head_gram_kernel, (gram_tiles, gram_tiles),
            c_ptr=c, gram_ptr=gram, part_ptr=part, n=n, num_t=num_t, width=width,
            ACC=acc, BLOCK_N=32, BLOCK_C=GRAM_TILE, num_warps=4,
        )
    mini = opts.mode == "mini"
    if mini:  # weight tiles: a line is a column of counts, else a row
        block_j, block_k = _tiles(num_m, num_t)
    else:
        block_k, block_j = _tiles(num_t, num_m)
    inv_n2 = split_f64(1.0 / float(n * n))
    alpha = split_f64(opts.alpha)
    beta = split_f64(opts.beta)
    launch(
        _head_finish_kernel, (1,),
        labels_ptr=labels, row_ptr=per_row, counts_ptr=counts, owned_ptr=owned, weight_ptr=weights,
        delta_ptr=scalar(opts.delta, torch.float64, device), class_ptr=per_class, part_ptr=part,
        num_parts=num_parts, gram_ptr=gram, stats_ptr=stats, loss_ptr=loss, n=n, num_t=num_t, num_m=num_m,
        inv_n2_hi=inv_n2[0], inv_n2_lo=inv_n2[1], alpha_hi=alpha[0], alpha_lo=alpha[1],
        beta_hi=beta[0], beta_lo=beta[1],
        MINI=mini, SMALL=one_tile, BY_WEIGHT=opts.target_normalize == "weight_sum", BALANCE=opts.aux_balance,
        ACC=acc, BLOCK=min(1024, max(16, triton.next_power_of_2(max(n, num_t * num_m, 2 * width)))),
        BLOCK_CLS=min(1024, triton.next_power_of_2(max(num_t, num_m))), BLOCK_K=block_k, BLOCK_J=block_j,
        BLOCK_W=block_w, BLOCK_P=min(1024, triton.next_power_of_2(num_parts)),
        num_warps=8 if one_tile and block_w > 64 else 4,
    )
    return (loss, stats, weights, counts), (c, gram, labels, per_row, per_class)


def _backward(grad_loss, c, gram, labels, per_row, per_class, num_t: int, grad_dtypes, opts: HeadObjectiveOptions):
    """The backward launch: gradients of the loss w.r.t. the prediction-view logits of both heads."""
    n, width = c.shape
    one_tile = _one_tile(width)
    grad_t = torch.empty(n, num_t, dtype=grad_dtypes[0], device=c.device)
    grad_m = torch.empty(n, width - num_t, dtype=grad_dtypes[1], device=c.device)
    d = c if one_tile else torch.empty_like(c)  # the wide path keeps D = dL_s/dC there
    if one_tile:  # whole rows of C in one tile
        block_w = _gram_block(width)
        block_r = max(16, min(64 if block_w <= 64 else 32, triton.next_power_of_2(n)))
        block_p, block_q = block_w, min(32, block_w)
    else:
        block_r = max(16, min(32, triton.next_power_of_2(n)))
        block_p, block_q = GRAD_TILE_P, GRAD_TILE_Q
    scale = split_f64(4.0 / float(n * n))
    alpha = split_f64(opts.alpha)
    beta = split_f64(opts.beta)
    launch(
        _head_grad_kernel, (triton.cdiv(n, block_r),),
        c_ptr=c, gram_ptr=gram, labels_ptr=labels, row_ptr=per_row, class_ptr=per_class,
        grad_out_ptr=grad_loss.detach().to(c.dtype).contiguous(), d_ptr=d, gt_ptr=grad_t, gm_ptr=grad_m,
        n=n, num_t=num_t, width=width, scale_hi=scale[0], scale_lo=scale[1], alpha_hi=alpha[0],
        alpha_lo=alpha[1], beta_hi=beta[0], beta_lo=beta[1],
        gtn=grad_t.stride(0), gtk=grad_t.stride(1), gmn=grad_m.stride(0), gmk=grad_m.stride(1),
        NORMALIZE=opts.normalize_rows, WHOLE=one_tile, ACC=tl_dtype(c.dtype),
        BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_Q=block_q, num_warps=warps_for(block_r * block_p),
    )
    return grad_t, grad_m


class _HeadObjectiveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zt1, zm1, zt2, zm2, opts: HeadObjectiveOptions):
        (loss, stats, weights, counts), saved = _forward(zt1, zm1, zt2, zm2, opts)
        ctx.save_for_backward(*saved)
        ctx.opts = opts
        ctx.num_t = zt1.shape[1]
        ctx.grad_dtypes = (zt1.dtype, zm1.dtype)
        ctx.mark_non_differentiable(stats, weights, counts)
        return loss, stats, weights, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _stats, _weights, _counts):
        grad_t, grad_m = _backward(grad_loss, *ctx.saved_tensors, ctx.num_t, ctx.grad_dtypes, ctx.opts)
        return grad_t, grad_m, None, None, None


@dataclass
class HeadObjective:
    """What one fused step returns. Nothing here has been read back to the host yet."""

    loss: torch.Tensor  # 0-d, L_r + alpha L_m + beta L_s; back-propagates into logits_t1 and logits_m1
    stats: torch.Tensor  # [l_r, l_m, l_s, n_confident_t, n_confident_m] on the device
    weights: torch.Tensor  # K float32 cluster weights (no gradient)
    counts: torch.Tensor  # K x M int64 contingency matrix they came from

    def values(self) -> dict:
        """The statistics as Python numbers (one device-to-host copy), keyed like HeadGuided's stats."""
        l_r, l_m, l_s, n_t, n_m = self.stats.tolist()
        return {"l_r": l_r, "n_confident_t": int(n_t), "l_m": l_m, "l_s": l_s, "n_confident_m": int(n_m)}


def head_objective(
    logits_t1: torch.Tensor,
    logits_m1: torch.Tensor,
    logits_t2: torch.Tensor,
    logits_m2: torch.Tensor,
    *,
    tau: float,
    delta: float,
    alpha: float,
    beta: float,
    mode: str = "mini",
    weight_view: str = "prediction",
    target_normalize: str = "weight_sum",
    aux_balance: bool = True,
    normalize_rows: bool = True,
) -> HeadObjective:
    """The MiniClustering / MaxiClustering objective of one batch (cross-entropy L_r), fused.

    Equals ``HeadGuided.batch_loss`` over ``mcscale.objectives`` with ``loss="ce"`` and
    ``weight_estimate="batch"``; the keyword arguments are those of ``HeadObjectiveOptions``. An
    empty confident set makes its term a zero with zero gradient (the caller decides whether to skip
    the batch, from ``values()``). ``logits_t2`` and ``logits_m2`` get no gradient. Three Triton
    launches per step when K + M <= 128, four when wider; see the module docstring.
    """
    opts = HeadObjectiveOptions(
        tau=tau, delta=delta, alpha=alpha, beta=beta, mode=mode, weight_view=weight_view,
        target_normalize=target_normalize, aux_balance=aux_balance, normalize_rows=normalize_rows,
    )
    shapes = [tuple(t.shape) for t in (logits_t1, logits_m1, logits_t2, logits_m2)]
    if any(len(s) != 2 for s in shapes) or shapes[0] != shapes[2] or shapes[1] != shapes[3] \
            or shapes[0][0] != shapes[1][0]:
        raise ValueError(f"head_objective: need N x K, N x M, N x K, N x M logits, got {shapes}")
    if shapes[0][0] == 0 or shapes[0][1] == 0 or shapes[1][1] == 0:
        raise ValueError(f"head_objective: empty batch or head, got {shapes}")
    check_launchable("head_objective", logits_t1, logits_m1, logits_t2, logits_m2)
    loss, stats, weights, counts = _HeadObjectiveFunction.apply(
        logits_t1, logits_m1, logits_t2.detach(), logits_m2.detach(), opts
    )
    return HeadObjective(loss, stats, weights, counts)
