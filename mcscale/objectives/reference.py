"""The per-batch objectives of the methods as pure tensor functions, in one process.

Every formula here is the readable reference of ``shared/METHOD.md`` (sections 3, 4 and 7); the Triton
kernels in ``mcscale.kernels`` and the multi-rank versions in ``global_batch`` are checked against
these, and ``global_batch`` builds on the helpers below (``accum_dtype``, ``confident_labels``,
``grams`` / ``gram_loss``, ``balanced_factors``, ``long_tail_inputs``, ``soft_ce_terms``). No globals,
no device moves: each function works on whatever device the inputs live on and reduces in float32 or
better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcscale.objectives.p2ot import p2ot_plan

__all__ = [
    "contingency",
    "class_weights",
    "confident_cross_entropy",
    "similarity_alignment",
    "long_tail_cross_entropy",
    "effective_counts",
    "soft_cross_entropy",
    "p2ot_targets",
]

WEIGHT_MODES = ("mini", "maxi")
NORMALIZATIONS = ("weight_sum", "count")
LONG_TAIL_VARIANTS = ("cb", "balms", "eql")


def accum_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every lower precision is reduced in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def contingency(
    target_labels: torch.Tensor, aux_labels: torch.Tensor, num_target: int, num_aux: int
) -> torch.Tensor:
    """T[k, j] = #{i : target_labels[i] = k and aux_labels[i] = j}, a (num_target, num_aux) LongTensor."""
    if target_labels.shape != aux_labels.shape or target_labels.dim() != 1:
        raise ValueError(
            f"contingency: label vectors must be 1-D and equally long, got {tuple(target_labels.shape)}"
            f" and {tuple(aux_labels.shape)}"
        )
    flat = target_labels.long() * num_aux + aux_labels.long()
    counts = torch.bincount(flat, minlength=num_target * num_aux)
    if counts.numel() != num_target * num_aux:
        raise ValueError("contingency: a label is outside [0, num_target) x [0, num_aux)")
    return counts.view(num_target, num_aux)


def class_weights(counts: torch.Tensor, delta: float, mode: str = "mini") -> torch.Tensor:
    """Per-cluster weights from a K x M contingency matrix (METHOD.md section 3).

    mini (Eq. 2): each mini-cluster column is normalised over the K target clusters; c_k counts the
    columns where cluster k holds a share strictly above ``delta``; w_k = M / max(c_k, 0.5).
    maxi (Eq. 6): each target row is normalised over the M maxi-clusters; c_k counts the entries
    strictly above ``delta``; w_k = max(c_k, 0.5). An empty column (row) contributes nothing.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"class_weights: mode must be one of {WEIGHT_MODES}, got {mode!r}")
    t = counts.detach().to(torch.float64)
    num_aux = t.shape[1]
    axis = 0 if mode == "mini" else 1
    totals = t.sum(dim=axis, keepdim=True)
    shares = torch.where(totals > 0, t / totals.clamp_min(1.0), torch.zeros_like(t))
    owned = (shares > delta).sum(dim=1).to(torch.float32)
    floored = owned.clamp_min(0.5)
    return (num_aux / floored) if mode == "mini" else floored


def confident_labels(pseudo_logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The confident set of the pseudo-label view, no gradient: (mask max p > tau (strict), argmax labels)."""
    with torch.no_grad():
        probs = torch.softmax(pseudo_logits.detach().to(accum_dtype(pseudo_logits)), dim=1)
        confidence, labels = probs.max(dim=1)
        return confidence > tau, labels


def balanced_factors(per_class: torch.Tensor) -> torch.Tensor:
    """The class-balanced factor |S| / n_c of each class c from the counts n_c of the confident set S
    (float32: the sum of the integer counts is exact there)."""
    per_class = per_class.to(torch.float32)
    return per_class.sum() / per_class.clamp_min(1.0)


def confident_cross_entropy(
    logits: torch.Tensor,
    pseudo_logits: torch.Tensor,
    tau: float,
    class_weight: torch.Tensor | None = None,
    balance: bool = False,
    normalize: str = "weight_sum",
):
    """Cross-entropy of ``logits`` on the confident pseudo-labels of ``pseudo_logits``.

    Confident set S = {i : max softmax(pseudo_logits_i) > tau}, y_i its argmax (no gradient). Each
    term is weighted by ``class_weight[y_i]`` (and by the class-balanced factor when ``balance``).
    ``normalize="weight_sum"`` divides by the sum of the weights over S (the authors' code),
    ``"count"`` by |S| (the paper). Returns ``(loss, num_selected)``; with an empty S the loss is a
    zero that is still connected to ``logits``.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"confident_cross_entropy: normalize must be one of {NORMALIZATIONS}")
    mask, labels = confident_labels(pseudo_logits, tau)
    num_selected = int(mask.sum())
    dtype = accum_dtype(logits)
    if num_selected == 0:
        return logits.sum() * 0.0, 0
    num_classes = logits.shape[1]
    weights = torch.ones(logits.shape[0], dtype=dtype, device=logits.device)
    if class_weight is not None:
        weights = weights * class_weight.detach().to(dtype)[labels]
    if balance:
        per_class = torch.bincount(labels[mask], minlength=num_classes)
        weights = weights * balanced_factors(per_class).to(dtype)[labels]
    log_probs = F.log_softmax(logits.to(dtype), dim=1)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    weights = weights * mask.to(dtype)
    total = (weights * nll).sum()
    denom = weights.sum() if normalize == "weight_sum" else torch.tensor(float(num_selected), dtype=dtype)
    return total / denom, num_selected


def grams(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A^T A, B^T B and A^T B: the K x K, M x M and K x M Gram matrices of L_s."""
    return a.T @ a, b.T @ b, a.T @ b


def gram_loss(gt: torch.Tensor, gm: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """sum (A A^T - B B^T)^2 = ||A^T A||^2 + ||B^T B||^2 - 2 ||A^T B||^2 (no N x N matrix)."""
    return (gt * gt).sum() + (gm * gm).sum() - 2.0 * (gx * gx).sum()


def alignment_inputs(probs_t: torch.Tensor, probs_m: torch.Tensor, normalize_rows: bool):
    """Both heads' probabilities in the accumulation dtype, rows L2-normalised when asked."""
    dtype = accum_dtype(probs_t)
    a, b = probs_t.to(dtype), probs_m.to(dtype)
    if normalize_rows:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a, b


def similarity_alignment(
    probs_t: torch.Tensor, probs_m: torch.Tensor, normalize_rows: bool = True, method: str = "gram"
) -> torch.Tensor:
    """L_s = (1/N^2) * sum_ij (S_t - S_m)^2 with S = P P^T (METHOD.md section 4).

    ``normalize_rows`` L2-normalises each probability row first (cosine similarity, the code's form).
    ``method="gram"`` uses ||P_t^T P_t||^2 + ||P_m^T P_m||^2 - 2 ||P_t^T P_m||^2 and never builds the
    N x N matrix; ``"dense"`` builds it. Both give the same value and gradient.
    """
    if probs_t.shape[0] != probs_m.shape[0]:
        raise ValueError("similarity_alignment: both heads need the same number of rows")
    a, b = alignment_inputs(probs_t, probs_m, normalize_rows)
    n = a.shape[0]
    if method == "gram":
        total = gram_loss(*grams(a, b))
    elif method == "dense":
        total = ((a @ a.T - b @ b.T) ** 2).sum()
    else:
        raise ValueError(f"similarity_alignment: method must be 'gram' or 'dense', got {method!r}")
    return total / float(n * n)


def effective_counts(weights: torch.Tensor, num_aux: int, mode: str = "mini") -> torch.Tensor:
    """n_k, the effective number of mini-clusters of cluster k (Appendix G): M / w_k in mini mode.

    In maxi mode the weight already is the (floored) number of maxi-clusters a cluster splits over, a
    tail signal: the head-ness is then its reciprocal, so n_k = M / w_k is used there too.
    """
    return float(num_aux) / weights.to(torch.float32)


def long_tail_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mini_counts: torch.Tensor,
    variant: str = "cb",
    gamma: float = 0.999,
    mask: torch.Tensor | None = None,
    num_aux: int | None = None,
) -> torch.Tensor:
    """Label-dependent long-tail losses fed with estimated cluster sizes (paper Appendix G).

    ``mini_counts`` is n_k (see :func:`effective_counts`). ``variant``:
    - ``"cb"``: class-balanced softmax, per-sample weight (1 - gamma) / (1 - gamma^{n_y}), weighted mean.
    - ``"balms"``: balanced softmax with prior pi = n / sum(n): logits shifted by log pi, plain mean.
    - ``"eql"``: log p_i = z_i - logsumexp_j(z_j + log w_j), plain mean, with w_j = num_aux / n_j (the
      Eq. 2 weight) when ``num_aux`` is given, else w_j = max(n) / n_j; the two differ by a constant
      factor, which shifts the value by a constant and leaves the gradient unchanged.
    ``mask`` selects the samples (e.g. the confident set); an empty selection gives a connected zero.
    """
    if variant not in LONG_TAIL_VARIANTS:
        raise ValueError(f"long_tail_cross_entropy: variant must be one of {LONG_TAIL_VARIANTS}")
    z, n = long_tail_inputs(logits, mini_counts)
    if mask is None:
        mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if int(mask.sum()) == 0:
        return logits.sum() * 0.0
    per_sample, weights = long_tail_terms(z[mask], targets[mask].long(), n, variant, gamma, num_aux)
    if weights is None:
        return per_sample.mean()
    return (weights * per_sample).sum() / weights.sum()


def long_tail_inputs(logits: torch.Tensor, mini_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, n): the logits in the accumulation dtype and the counts n_k clamped to 1e-12, in z's dtype."""
    z = logits.to(accum_dtype(logits))
    return z, mini_counts.detach().to(device=z.device, dtype=z.dtype).clamp_min(1e-12)


def long_tail_terms(z, y, n, variant: str, gamma: float, num_aux: int | None):
    """Per-sample losses of :func:`long_tail_cross_entropy` on the selected rows, and their weights
    (None: a plain mean). ``n`` are the clamped counts in ``z``'s dtype."""
    if variant == "cb":
        weight = (1.0 - gamma) / (1.0 - torch.pow(torch.as_tensor(gamma, dtype=z.dtype), n))
        return -F.log_softmax(z, dim=1).gather(1, y[:, None]).squeeze(1), weight[y]
    if variant == "balms":  # balanced softmax: logits shifted by the log prior n / sum(n)
        return F.cross_entropy(z + torch.log(n / n.sum()), y, reduction="none"), None
    scale = n.max() if num_aux is None else torch.as_tensor(float(num_aux), dtype=z.dtype)
    log_p_y = z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z + torch.log(scale / n), dim=1)
    return -log_p_y, None


# ---------------------------------------------------------------- P2OT (METHOD section 7)
def soft_ce_terms(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None):
    """Per-sample soft-target cross-entropy -sum_k q_ik log p_ik (float32) and the per-sample weights
    weights[argmax q_i] (None without ``weights``: a plain mean)."""
    per_sample = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)
    return per_sample, None if weights is None else weights[target.argmax(1)]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """P2OT's loss: the mean soft-target cross-entropy of ``logits`` on the plan rows ``target``, or
    with per-cluster ``weights`` the weighted mean with w_i = weights[argmax target_i]."""
    per_sample, w = soft_ce_terms(logits, target, weights)
    if w is None:
        return per_sample.mean()
    return (w * per_sample).sum() / w.sum()


def p2ot_targets(logits: torch.Tensor, rho: float, buffer: torch.Tensor | None = None, **solver_options):
    """The P2OT plan rows of the batch ``logits`` (detached float), solved over [buffer; batch].

    Returns ``(rows, state)``: ``state`` is ``p2ot_plan``'s plus ``"global_logits"``, the batch to push
    into the FIFO buffer (here the batch itself; ``global_batch.global_p2ot_plan`` gathers it).
    ``solver_options`` go to ``p2ot_plan``.
    """
    pool = logits if buffer is None else torch.cat([buffer.to(logits.device), logits])
    plan, state = p2ot_plan(pool, rho, **solver_options)
    return plan[-logits.shape[0]:], {**state, "global_logits": logits}
