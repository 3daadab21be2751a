"""Confident, weighted cross-entropy (METHOD.md section 4, L_r and L_m) as Triton kernels.

Forward, one pass over the rows: softmax of the pseudo-logits, confidence, pseudo-label, mask,
log-softmax of the logits and the per-row NLL; per-class sums of the selected rows (count and NLL)
are reduced inside each program and scattered with atomics. A one-program finish turns the per-class
sums into the loss and a per-class coefficient, since the weight of a row depends on its class only:

    loss = sum_i coef[y_i] * nll_i,  coef[c] = class_weight[c] * (|S| / n_c if balance) / denom,

with denom = sum of the weights over S ("weight_sum") or |S| ("count"). Backward, one more pass:
d loss / d logits_i = g * coef[y_i] * (softmax(logits_i) - onehot(y_i)) on the selected rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import accum_dtype, check_launchable, launch, scalar, tl_dtype, warps_for

__all__ = ["confident_cross_entropy"]

NORMALIZATIONS = ("weight_sum", "count")
MAX_CLASSES = 1 << 16  # a row is one tile; beyond this it would not fit in registers


@triton.jit
def _ce_forward_kernel(
    logits_ptr, pseudo_ptr, tau_ptr, labels_ptr, lse_ptr, count_ptr, nll_sum_ptr, n, num_classes,
    stride_ln, stride_lk, stride_pn, stride_pk,
    PACC: tl.constexpr, LACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    row_live = rows < n
    col_live = (cols < num_classes)[None, :]
    live = row_live[:, None] & col_live
    rows64 = rows.to(tl.int64)[:, None]
    # Pseudo-labels: softmax of the pseudo view in its accumulation dtype, as the reference.
    # Padding columns are -inf (no mass); padding rows are 0 so they stay finite, and are dropped.
    q = tl.load(pseudo_ptr + rows64 * stride_pn + cols[None, :] * stride_pk, mask=live, other=0.0)
    q = tl.where(col_live, q.to(PACC), -float("inf"))
    q_max = tl.max(q, axis=1)
    e = tl.where(col_live, tl.exp(q - q_max[:, None]), 0.0)
    probs = e / tl.sum(e, axis=1)[:, None]
    confidence = tl.max(probs, axis=1)
    label = tl.argmax(probs, axis=1)  # first index on ties, like torch.max
    tau = tl.load(tau_ptr)
    selected = row_live & (confidence > tau)
    # Per-row NLL of the logits at the pseudo-label.
    z = tl.load(logits_ptr + rows64 * stride_ln + cols[None, :] * stride_lk, mask=live, other=0.0)
    z = tl.where(col_live, z.to(LACC), -float("inf"))
    z_max = tl.max(z, axis=1)
    lse = z_max + tl.log(tl.sum(tl.where(col_live, tl.exp(z - z_max[:, None]), 0.0), axis=1))
    onehot = (cols[None, :] == label[:, None]) & selected[:, None]
    z_label = tl.sum(tl.where(onehot, z, 0.0), axis=1)
    nll = tl.where(selected, lse - z_label, 0.0)
    tl.store(labels_ptr + rows, tl.where(selected, label, -1), mask=row_live)
    tl.store(lse_ptr + rows, lse, mask=row_live)
    # Reduce over the rows of this program first: one atomic per class present in the block.
    per_class_count = tl.sum(onehot.to(LACC), axis=0)
    per_class_nll = tl.sum(tl.where(onehot, nll[:, None], 0.0), axis=0)
    touched = (cols < num_classes) & (per_class_count > 0)
    tl.atomic_add(count_ptr + cols, per_class_count, mask=touched)
    tl.atomic_add(nll_sum_ptr + cols, per_class_nll, mask=touched)


@triton.jit
def _ce_coefficients(
    count_ptr, nll_sum_ptr, weight_ptr, coef_ptr, num_classes,
    HAS_WEIGHT: tl.constexpr, BALANCE: tl.constexpr, BY_WEIGHT: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-class sums -> coef[c] (written) and (loss, |S|) (returned); one program, BLOCK classes a step."""
    # Three short passes over the classes: |S|; per-class weights and the weighted sums; coef.
    counted = tl.zeros([BLOCK], dtype=ACC)
    for c0 in range(0, num_classes, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        counted += tl.load(count_ptr + cols, mask=cols < num_classes, other=0.0)
    num_selected = tl.sum(counted, axis=0)
    weighted_nll = tl.zeros([BLOCK], dtype=ACC)
    weight_mass = tl.zeros([BLOCK], dtype=ACC)
    for c0 in range(0, num_classes, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        live = cols < num_classes
        count = tl.load(count_ptr + cols, mask=live, other=0.0)
        w = tl.full([BLOCK], 1.0, ACC)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=live, other=0.0).to(ACC)
        if BALANCE:  # |S| / n_c in float32 (correctly rounded), as the reference, whatever the dtype
            share = tl.math.div_rn(tl.full([BLOCK], 1.0, tl.float32) * num_selected.to(tl.float32),
                                   tl.maximum(count, 1.0).to(tl.float32))
            w = w * share.to(ACC)
        tl.store(coef_ptr + cols, w, mask=live)
        weighted_nll += w * tl.load(nll_sum_ptr + cols, mask=live, other=0.0)
        weight_mass += w * count
    total = tl.sum(weighted_nll, axis=0)
    denom = tl.sum(weight_mass, axis=0) if BY_WEIGHT else num_selected
    any_selected = num_selected > 0
    safe_denom = tl.where(any_selected, denom, 1.0)
    tl.debug_barrier()  # the per-class weights stored above are read back, maybe by other threads
    for c0 in range(0, num_classes, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        live = cols < num_classes
        w = tl.load(coef_ptr + cols, mask=live, other=0.0)
        tl.store(coef_ptr + cols, tl.where(any_selected, w / safe_denom, 0.0), mask=live)
    return tl.where(any_selected, total / safe_denom, 0.0), num_selected


@triton.jit
def _ce_finish_kernel(
    count_ptr, nll_sum_ptr, weight_ptr, coef_ptr, loss_ptr, selected_ptr, num_classes,
    HAS_WEIGHT: tl.constexpr, BALANCE: tl.constexpr, BY_WEIGHT: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    loss, num_selected = _ce_coefficients(count_ptr, nll_sum_ptr, weight_ptr, coef_ptr, num_classes,
                                          HAS_WEIGHT, BALANCE, BY_WEIGHT, ACC, BLOCK)
    tl.store(loss_ptr, loss)
    tl.store(selected_ptr, num_selected.to(tl.int32))


@triton.jit
def _ce_backward_kernel(
    logits_ptr, labels_ptr, lse_ptr, coef_ptr, grad_out_ptr, grad_ptr, n, num_classes,
    stride_ln, stride_lk, stride_gn, stride_gk,
    LACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    row_live = rows < n
    live = row_live[:, None] & (cols < num_classes)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    label = tl.load(labels_ptr + rows, mask=row_live, other=-1)
    selected = label >= 0
    lse = tl.load(lse_ptr + rows, mask=row_live, other=0.0)
    coef = tl.load(coef_ptr + tl.maximum(label, 0), mask=row_live & selected, other=0.0)
    scale = tl.where(selected, coef * tl.load(grad_out_ptr).to(LACC), 0.0)
    z = tl.load(logits_ptr + rows64 * stride_ln + cols[None, :] * stride_lk, mask=live, other=0.0)
    probs = tl.exp(z.to(LACC) - lse[:, None])
    onehot = (cols[None, :] == label[:, None]).to(LACC)
    grad = scale[:, None] * (probs - onehot)
    tl.store(grad_ptr + rows64 * stride_gn + cols[None, :] * stride_gk,
             grad.to(grad_ptr.dtype.element_ty), mask=live)


def _row_tiles(n: int, num_classes: int) -> tuple[int, int, int]:
    """(rows per program, class block, num_warps): tiles of about 4096 values."""
    block_k = triton.next_power_of_2(max(num_classes, 1))
    block_r = max(1, min(4096 // block_k, 64, triton.next_power_of_2(max(n, 1))))
    return block_r, block_k, warps_for(block_r * block_k)


class _ConfidentCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, pseudo, tau, class_weight, balance, by_weight):
        n, num_classes = logits.shape
        device = logits.device
        lacc_dtype = accum_dtype(logits)
        pacc_dtype = accum_dtype(pseudo)
        lacc = tl_dtype(lacc_dtype)
        pacc = tl_dtype(pacc_dtype)
        labels = torch.empty(n, dtype=torch.int32, device=device)
        lse = torch.empty(n, dtype=lacc_dtype, device=device)
        sums = torch.zeros(2, num_classes, dtype=lacc_dtype, device=device)  # count, NLL per class
        coef = torch.empty(num_classes, dtype=lacc_dtype, device=device)
        loss = torch.empty((), dtype=lacc_dtype, device=device)
        num_selected = torch.empty((), dtype=torch.int32, device=device)
        block_r, block_k, warps = _row_tiles(n, num_classes)
        if n > 0:
            launch(
                _ce_forward_kernel, (triton.cdiv(n, block_r),),
                logits, pseudo, scalar(tau, pacc_dtype, device), labels, lse, sums[0], sums[1],
                n, num_classes, logits.stride(0), logits.stride(1), pseudo.stride(0), pseudo.stride(1),
                PACC=pacc, LACC=lacc, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
            )
        has_weight = class_weight is not None
        weight = class_weight.detach().to(lacc_dtype).contiguous() if has_weight else coef
        launch(
            _ce_finish_kernel, (1,),
            sums[0], sums[1], weight, coef, loss, num_selected, num_classes,
            HAS_WEIGHT=has_weight, BALANCE=balance, BY_WEIGHT=by_weight, ACC=lacc,
            BLOCK=min(block_k, 1024), num_warps=4,
        )
        ctx.save_for_backward(logits, labels, lse, coef)
        ctx.mark_non_differentiable(num_selected)
        return loss, num_selected

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_count):
        logits, labels, lse, coef = ctx.saved_tensors
        n, num_classes = logits.shape
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if n > 0:
            block_r, block_k, warps = _row_tiles(n, num_classes)
            launch(
                _ce_backward_kernel, (triton.cdiv(n, block_r),),
                logits, labels, lse, coef, grad_loss.contiguous(), grad, n, num_classes,
                logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1),
                LACC=tl_dtype(lse.dtype), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=warps,
            )
        return grad, None, None, None, None, None


def confident_cross_entropy(
    logits: torch.Tensor,
    pseudo_logits: torch.Tensor,
    tau: float,
    class_weight: torch.Tensor | None = None,
    balance: bool = False,
    normalize: str = "weight_sum",
):
    """Cross-entropy of ``logits`` on the confident pseudo-labels of ``pseudo_logits`` (Triton).

    Same contract as ``mcscale.objectives.confident_cross_entropy``: returns ``(loss, num_selected)``
    with ``num_selected`` a Python int (reading it synchronises with the device); with an empty
    confident set the loss is a zero that back-propagates zero gradients. ``pseudo_logits`` never
    receives a gradient.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"confident_cross_entropy: normalize must be one of {NORMALIZATIONS}")
    if logits.dim() != 2 or logits.shape != pseudo_logits.shape:
        raise ValueError(
            f"confident_cross_entropy: logits {tuple(logits.shape)} and pseudo_logits "
            f"{tuple(pseudo_logits.shape)} must be the same N x K shape"
        )
    if logits.shape[1] > MAX_CLASSES:
        raise ValueError(f"confident_cross_entropy: at most {MAX_CLASSES} classes per row tile")
    if class_weight is not None and class_weight.shape != (logits.shape[1],):
        raise ValueError("confident_cross_entropy: class_weight must have one entry per class")
    tensors = (logits, pseudo_logits) + (() if class_weight is None else (class_weight,))
    check_launchable("confident_cross_entropy", *tensors)
    loss, count = _ConfidentCrossEntropy.apply(
        logits, pseudo_logits.detach(), float(tau), class_weight, bool(balance), normalize == "weight_sum"
    )
    num_selected = int(count)
    if num_selected == 0:
        return loss.to(logits.dtype), 0  # the reference returns logits.sum() * 0.0
    return loss, num_selected
