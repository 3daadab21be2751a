"""Exact global-batch statistics under data parallelism (issue 5; METHOD.md sections 3, 4 and 7).

With world size W and global batch B, every rank holds B / W rows. The per-batch quantities of the
methods (contingency counts, loss denominators, balanced-CE class counts, the L_s Gram matrices, the
P2OT plan) are statistics of the GLOBAL batch: here they are summed (or gathered) across ranks so that
every number equals the one a single process holding all B rows computes. Without an initialised
``torch.distributed`` process group (world size 1) every function reduces to the plain reference of
``mcscale.objectives`` and issues no collective.

Scaling convention (read this before wiring a trainer)
------------------------------------------------------
Every loss returned here is a tensor whose

* value is the loss of the global batch, identical on every rank: log it as it is;
* gradient is ``grad_scale`` times the gradient of that global loss with respect to this rank's
  rows, ``grad_scale`` = W by default.

DDP (and Accelerate's ``accelerator.backward`` on a DDP model) AVERAGES parameter gradients over the
W ranks, so the applied gradient is (1/W) sum_r W dL/dtheta|_(rows of r) = dL/dtheta, exactly the
single-process gradient. Do not divide these losses by W and do not scale them again; losses built
from them linearly (L_r + alpha L_m + beta L_s) keep both properties. A trainer that SUMS gradients
over ranks instead of averaging them passes ``grad_scale=1``.

Whether a batch is skipped (empty confident set) is decided from the global counts returned here,
so every rank takes the same decision and no rank waits in a collective the others skipped.

Communication accounting: every collective issued here records the bytes of the tensor this rank
hands to it in a :class:`CommCounter` (the module's ``COMM`` unless one is passed); the trainer logs
``COMM.take()`` once per step. That is the message size: a ring all-reduce puts about 2 (W-1)/W times
it on the wire per rank, an all-gather receives W - 1 times it.

Tensors must live where the backend expects them (CPU for gloo, the rank's GPU for nccl).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcscale.objectives import reference as ref
from mcscale.objectives.ops import Ops
from mcscale.objectives.reference import (
    accum_dtype,
    alignment_inputs,
    balanced_factors,
    confident_labels,
    gram_loss,
    grams,
    long_tail_inputs,
    soft_ce_terms,
)
from mcscale.parallel import (
    CommCounter,
    _gather_rows,
    _gather_sizes,
    _offset,
    _splice,
    all_reduce_sum,
    world_size,
)

__all__ = [
    "global_contingency",
    "global_confident_cross_entropy",
    "similarity_messages",
    "choose_similarity_method",
    "global_similarity_alignment",
    "global_long_tail_cross_entropy",
    "global_soft_cross_entropy",
    "global_p2ot_plan",
    "GlobalOps",
]


SIMILARITY_METHODS = ("auto", "gram", "gather")


def _grad_scale(grad_scale: float | None) -> float:
    """W by default: DDP averages gradients over the W ranks (see the module docstring)."""
    return float(world_size()) if grad_scale is None else float(grad_scale)


def _ddp_loss(local_part: torch.Tensor, global_value: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """A tensor whose value is ``global_value`` and whose gradient is grad_scale * d local_part.

    ``scaled - scaled.detach()`` is exactly zero, so the logged value is the global value bit for bit.
    """
    scaled = local_part * grad_scale
    return scaled - scaled.detach() + global_value.detach().to(scaled.dtype)


# ---------------------------------------------------------------- contingency (METHOD section 3)
def global_contingency(
    target_labels: torch.Tensor,
    aux_labels: torch.Tensor,
    num_target: int,
    num_aux: int,
    counter: CommCounter | None = None,
    local_contingency=ref.contingency,
) -> torch.Tensor:
    """The K x M counts of the global batch: local counts (``local_contingency``: the reference or
    the Triton kernel) summed over ranks (int64, K M 8 bytes).

    Sum before ``class_weights``: the weights are a nonlinear function of the counts.
    """
    return all_reduce_sum(local_contingency(target_labels, aux_labels, num_target, num_aux), counter)


# ---------------------------------------------------------------- L_r / L_m (METHOD section 4)
def _class_factors(counts: torch.Tensor, class_weight, balance: bool, dtype, device) -> torch.Tensor:
    """Per-class weight w_c (times the balanced factor |S| / n_c of the GLOBAL confident set)."""
    factors = torch.ones(counts.shape[0], dtype=dtype, device=device)
    if class_weight is not None:
        factors = factors * class_weight.detach().to(device=device, dtype=dtype)
    if balance:  # float32, as the reference computes it
        factors = factors * balanced_factors(counts).to(dtype)
    return factors


def global_confident_cross_entropy(
    logits: torch.Tensor,
    pseudo_logits: torch.Tensor,
    tau: float,
    class_weight: torch.Tensor | None = None,
    balance: bool = False,
    normalize: str = "weight_sum",
    grad_scale: float | None = None,
    counter: CommCounter | None = None,
) -> tuple[torch.Tensor, int]:
    """``objectives.confident_cross_entropy`` of the global batch: returns ``(loss, |S| global)``.

    One all-reduce (float64, 2 C values): per-class counts of the local confident set and per-class
    sums of its NLL. The counts give |S|, the balanced factors and the weight-sum denominator
    (sum_c n_c w_c); the NLL sums give the global value for logging. The local surrogate
    sum_{i in S_r} w_i nll_i / denominator carries the gradient (times ``grad_scale``, see the module
    docstring). An empty global S gives a zero connected to ``logits`` and 0.
    """
    if normalize not in ref.NORMALIZATIONS:
        raise ValueError(f"global_confident_cross_entropy: normalize must be one of {ref.NORMALIZATIONS}")
    if world_size() == 1:
        return ref.confident_cross_entropy(logits, pseudo_logits, tau, class_weight, balance, normalize)
    mask, labels = confident_labels(pseudo_logits, tau)
    dtype, num_classes = accum_dtype(logits), logits.shape[1]
    nll = -F.log_softmax(logits.to(dtype), dim=1).gather(1, labels[:, None]).squeeze(1)
    chosen, chosen_nll = labels[mask], nll[mask]
    counts = torch.bincount(chosen, minlength=num_classes).to(torch.float64)
    nll_sums = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    nll_sums.index_add_(0, chosen, chosen_nll.detach().to(torch.float64))
    counts, nll_sums = all_reduce_sum(torch.cat([counts, nll_sums]), counter).split(num_classes)
    num_selected = int(counts.sum())
    if num_selected == 0:
        return logits.sum() * 0.0, 0
    factors = _class_factors(counts, class_weight, balance, dtype, logits.device)
    if normalize == "weight_sum":
        denom = (counts.to(dtype) * factors).sum()
    else:
        denom = torch.tensor(float(num_selected), dtype=dtype, device=logits.device)
    local = (factors[chosen] * chosen_nll).sum() / denom
    value = (factors.to(torch.float64) * nll_sums).sum() / denom.to(torch.float64)
    return _ddp_loss(local, value, _grad_scale(grad_scale)), num_selected


# ---------------------------------------------------------------- L_s (METHOD section 4)
def similarity_messages(n_global: int, num_target: int, num_aux: int) -> dict:
    """Elements each strategy moves: gather = N (K + M) rows, gram = K^2 + M^2 + K M Gram entries."""
    k, m = num_target, num_aux
    return {"gather": n_global * (k + m), "gram": k * k + m * m + k * m}


def choose_similarity_method(n_global: int, num_target: int, num_aux: int) -> str:
    """The smaller message: gather the probabilities when N (K + M) < K^2 + M^2 + K M, else Grams."""
    sizes = similarity_messages(n_global, num_target, num_aux)
    return "gather" if sizes["gather"] < sizes["gram"] else "gram"


def _alignment_by_gram(a, b, n_global: int, grad_scale: float, counter) -> torch.Tensor:
    """Sum the three Grams over ranks (one all-reduce); with G = sum_r G_r, d||G||^2 / dG_r = 2 G, so
    the local surrogate 2 (<Gt, gt> + <Gm, gm> - 2 <Gx, gx>) / N^2 has the global gradient."""
    local = grams(a, b)
    flat = torch.cat([g.detach().reshape(-1) for g in local])
    summed = all_reduce_sum(flat, counter).split([g.numel() for g in local])
    total = [s.view_as(g) for s, g in zip(summed, local)]
    norm = float(n_global) ** 2
    value = gram_loss(*total) / norm
    gt, gm, gx = local
    linear = 2.0 * ((total[0] * gt).sum() + (total[1] * gm).sum() - 2.0 * (total[2] * gx).sum()) / norm
    return _ddp_loss(linear, value, grad_scale)


def _alignment_by_gather(a, b, sizes: list[int], grad_scale: float, counter) -> torch.Tensor:
    """Gather both heads' rows in one message and evaluate the global loss identically on every rank;
    only the local rows carry gradient, which is then the global gradient for those rows."""
    k, start = a.shape[1], _offset(sizes)
    full = _gather_rows(torch.cat([a, b], dim=1), sizes, counter)
    full_a = _splice(full[:, :k], a, start)
    full_b = _splice(full[:, k:], b, start)
    loss = gram_loss(*grams(full_a, full_b)) / float(sum(sizes)) ** 2
    return _ddp_loss(loss, loss, grad_scale)


def global_similarity_alignment(
    probs_t: torch.Tensor,
    probs_m: torch.Tensor,
    normalize_rows: bool = True,
    method: str = "auto",
    grad_scale: float | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """``objectives.similarity_alignment`` of the global batch (value = global L_s, gradient per the
    module's convention). ``method``: "gram" (all-reduce K^2 + M^2 + K M entries), "gather"
    (all-gather the N x (K + M) rows) or "auto" (the smaller message, ``choose_similarity_method``).
    Both first gather the row counts (8 bytes per rank) for N_global and the choice.
    """
    if method not in SIMILARITY_METHODS:
        raise ValueError(f"global_similarity_alignment: method must be one of {SIMILARITY_METHODS}")
    if probs_t.shape[0] != probs_m.shape[0]:
        raise ValueError("global_similarity_alignment: both heads need the same number of rows")
    if world_size() == 1:
        return ref.similarity_alignment(probs_t, probs_m, normalize_rows)
    a, b = alignment_inputs(probs_t, probs_m, normalize_rows)
    sizes = _gather_sizes(a.shape[0], a.device, counter)
    n_global = sum(sizes)
    if n_global == 0:
        return (probs_t.sum() + probs_m.sum()) * 0.0
    if method == "auto":
        method = choose_similarity_method(n_global, a.shape[1], b.shape[1])
    scale = _grad_scale(grad_scale)
    if method == "gather":
        return _alignment_by_gather(a, b, sizes, scale, counter)
    return _alignment_by_gram(a, b, n_global, scale, counter)


# ---------------------------------------------------------------- weighted means (CB / BALMS / EQL, P2OT CE)
def _global_weighted_mean(values, weights, anchor, grad_scale, counter) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i over the global batch (w = 1: the global mean). One all-reduce of
    [numerator, denominator] in the values' dtype; a zero denominator gives a zero connected to anchor."""
    w = torch.ones_like(values) if weights is None else weights.detach().to(values.dtype)
    numerator = (w * values).sum()
    total = all_reduce_sum(torch.stack([numerator.detach(), w.sum()]), counter)
    if float(total[1]) == 0.0:
        return anchor.sum() * 0.0
    return _ddp_loss(numerator / total[1], total[0] / total[1], _grad_scale(grad_scale))


def global_long_tail_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mini_counts: torch.Tensor,
    variant: str = "cb",
    gamma: float = 0.999,
    mask: torch.Tensor | None = None,
    num_aux: int | None = None,
    grad_scale: float | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """``objectives.long_tail_cross_entropy`` of the global batch: CB a global weighted mean, BALMS
    and EQL a global mean over the selected rows (2 values all-reduced). ``mini_counts`` must be
    identical on every rank (derive it from ``global_contingency``)."""
    if variant not in ref.LONG_TAIL_VARIANTS:
        raise ValueError(f"global_long_tail_cross_entropy: variant must be one of {ref.LONG_TAIL_VARIANTS}")
    if world_size() == 1:
        return ref.long_tail_cross_entropy(logits, targets, mini_counts, variant, gamma, mask, num_aux)
    z, n = long_tail_inputs(logits, mini_counts)
    if mask is not None:
        z, targets = z[mask], targets[mask]
    per_sample, weights = ref.long_tail_terms(z, targets.long(), n, variant, gamma, num_aux)
    return _global_weighted_mean(per_sample, weights, logits, _grad_scale(grad_scale), counter)


def global_soft_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    grad_scale: float | None = None,
    counter: CommCounter | None = None,
) -> torch.Tensor:
    """P2OT's soft-target cross-entropy (``reference.soft_cross_entropy``) over the global batch: the
    global mean, or with per-cluster ``weights`` the weighted mean with w_i = weights[argmax target_i]."""
    per_sample, w = soft_ce_terms(logits, target, weights)
    return _global_weighted_mean(per_sample, w, logits, _grad_scale(grad_scale), counter)


# ---------------------------------------------------------------- P2OT (METHOD section 7)
def global_p2ot_plan(
    local_logits: torch.Tensor,
    rho: float,
    buffer: torch.Tensor | None = None,
    counter: CommCounter | None = None,
    **solver_options,
) -> tuple[torch.Tensor, dict]:
    """The P2OT plan of the global batch, solved over [buffer; rows of every rank in rank order].

    Returns ``(plan rows of this rank, state)``; ``state`` is ``p2ot_plan``'s (pass it back as
    ``warm_start``) plus ``"global_logits"``, the gathered detached batch: push that into the FIFO
    ``buffer`` (capacity = buffer_batches x the GLOBAL batch), so the buffer stays identical on every
    rank without a second gather. ``solver_options`` go to ``p2ot_plan`` (eps, lam, max_iter, tol,
    warm_start, hard_marginal).

    Cost: one all-gather of the N_global x K logits (plus 8 bytes for the row counts); then every rank
    solves the same full problem, O(iterations x (buffer + N_global) x K) work and (buffer + N_global)
    x K float64 memory per rank, i.e. the single-process cost, not divided by W. A Sinkhorn with
    row-sharded kernels would split the work but needs a K-vector all-reduce per iteration (up to
    max_iter latency-bound rounds); for K up to about 1000 and a 10-batch buffer the redundant solve is
    cheaper and gives bit-identical plans and warm starts on every rank.
    """
    sizes = _gather_sizes(local_logits.shape[0], local_logits.device, counter)
    rows, state = ref.p2ot_targets(_gather_rows(local_logits, sizes, counter), rho, buffer, **solver_options)
    start = _offset(sizes)
    return rows[start:start + local_logits.shape[0]], state


# ---------------------------------------------------------------- the methods' ops, globally
class GlobalOps(Ops):
    """The ``Ops`` of the global batch: every quantity a method asks for, over all ranks' rows.

    ``build_method`` hands this to a method when the world size is above 1, so the methods need no
    distributed code of their own. Counts and class weights use the local ops (Triton on CUDA) before
    and after their all-reduce; the losses are the global functions above (PyTorch; the fused kernels
    are per-process, so ``head_objective`` is None here).
    """

    name = "global"

    def __init__(self, local: Ops, similarity_method: str = "auto"):
        self.local = local
        self.similarity_method = similarity_method

    def contingency(self, target_labels, aux_labels, num_target: int, num_aux: int) -> torch.Tensor:
        return global_contingency(target_labels, aux_labels, num_target, num_aux,
                                  local_contingency=self.local.contingency)

    def class_weights(self, counts, delta: float, mode: str = "mini") -> torch.Tensor:
        return self.local.class_weights(counts, delta, mode)

    def confident_cross_entropy(self, logits, pseudo_logits, tau, class_weight=None, balance=False,
                                normalize="weight_sum"):
        return global_confident_cross_entropy(logits, pseudo_logits, tau, class_weight, balance, normalize)

    def similarity_alignment(self, probs_t, probs_m, normalize_rows: bool = True) -> torch.Tensor:
        return global_similarity_alignment(probs_t, probs_m, normalize_rows, method=self.similarity_method)

    def long_tail_cross_entropy(self, logits, targets, mini_counts, variant="cb", gamma=0.999, mask=None,
                                num_aux=None) -> torch.Tensor:
        return global_long_tail_cross_entropy(logits, targets, mini_counts, variant, gamma, mask, num_aux)

    def soft_cross_entropy(self, logits, target, weights=None) -> torch.Tensor:
        return global_soft_cross_entropy(logits, target, weights)

    def p2ot_targets(self, logits, rho: float, buffer=None, **solver_options):
        return global_p2ot_plan(logits, rho, buffer, **solver_options)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values)
