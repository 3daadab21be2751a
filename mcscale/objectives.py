"""The per-batch objectives of MiniClustering / MaxiClustering as pure tensor functions.

Every formula here is the readable reference of ``shared/METHOD.md`` (sections 3 and 4); the Triton
kernels in ``mcscale.kernels`` are checked against these. No globals, no device moves: each function
works on whatever device the inputs live on and reduces in float32 or better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcscale.p2ot import p2ot_plan, rho_schedule  # P2OT pseudo-labels (METHOD section 7)

__all__ = [
    "p2ot_plan",
    "rho_schedule",
    "contingency",
    "class_weights",
    "confident_cross_entropy",
    "similarity_alignment",
    "long_tail_cross_entropy",
    "effective_counts",
]

WEIGHT_MODES = ("mini", "maxi")
NORMALIZATIONS = ("weight_sum", "count")
LONG_TAIL_VARIANTS = ("cb", "balms", "eql")


def _accum_dtype(x: torch.Tensor) -> torch.dtype:
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


def _confident_pseudo_labels(pseudo_logits: torch.Tensor, tau: float):
    with torch.no_grad():
        probs = torch.softmax(pseudo_logits.detach().to(_accum_dtype(pseudo_logits)), dim=1)
        confidence, labels = probs.max(dim=1)
        return confidence > tau, labels


def _balanced_weights(labels: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Weight |S| / #{i in S : y_i = c} for each selected sample (class-balanced CE)."""
    per_class = torch.bincount(labels[mask], minlength=num_classes).to(torch.float32)
    num_selected = mask.sum().to(torch.float32)
    return num_selected / per_class.clamp_min(1.0)


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
    mask, labels = _confident_pseudo_labels(pseudo_logits, tau)
    num_selected = int(mask.sum())
    dtype = _accum_dtype(logits)
    if num_selected == 0:
        return logits.sum() * 0.0, 0
    num_classes = logits.shape[1]
    weights = torch.ones(logits.shape[0], dtype=dtype, device=logits.device)
    if class_weight is not None:
        weights = weights * class_weight.detach().to(dtype)[labels]
    if balance:
        weights = weights * _balanced_weights(labels, mask, num_classes).to(dtype)[labels]
    log_probs = F.log_softmax(logits.to(dtype), dim=1)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    weights = weights * mask.to(dtype)
    total = (weights * nll).sum()
    denom = weights.sum() if normalize == "weight_sum" else torch.tensor(float(num_selected), dtype=dtype)
    return total / denom, num_selected


def _gram_terms(probs_t: torch.Tensor, probs_m: torch.Tensor):
    gt = probs_t.T @ probs_t
    gm = probs_m.T @ probs_m
    gx = probs_t.T @ probs_m
    return (gt * gt).sum() + (gm * gm).sum() - 2.0 * (gx * gx).sum()


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
    dtype = _accum_dtype(probs_t)
    a = probs_t.to(dtype)
    b = probs_m.to(dtype)
    if normalize_rows:
        a = F.normalize(a, dim=1)
        b = F.normalize(b, dim=1)
    n = a.shape[0]
    if method == "gram":
        total = _gram_terms(a, b)
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
    dtype = _accum_dtype(logits)
    z = logits.to(dtype)
    n = mini_counts.detach().to(dtype).clamp_min(1e-12)
    if mask is None:
        mask = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if int(mask.sum()) == 0:
        return logits.sum() * 0.0
    per_sample, weights = long_tail_terms(z[mask], targets[mask].long(), n, variant, gamma, num_aux)
    if weights is None:
        return per_sample.mean()
    return (weights * per_sample).sum() / weights.sum()


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
