"""P2OT solver and rho schedule (METHOD.md section 7) against independent references written here."""

import math

import pytest
import torch

from mcscale.objectives import p2ot as p2ot_module
from mcscale.objectives.p2ot import marginal_exponent, p2ot_plan, rho_schedule

TIGHT = dict(tol=1e-10, max_iter=20000)


def _logits(n, k, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


def _augmented_kernel(logits, eps, rho):
    """M = exp(-[C, 0] / eps) and beta; the virtual column only when rho < 1."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    n, k = log_p.shape
    log_m = log_p / eps
    beta = torch.full((k,), rho / k, dtype=torch.float64)
    if rho < 1:
        log_m = torch.cat([log_m, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
        beta = torch.cat([beta, torch.tensor([1 - rho], dtype=torch.float64)])
    return log_m, beta


def _exponents(k, ncols, eps, lam, hard):
    f = torch.ones(ncols, dtype=torch.float64)
    if not hard:
        f[:k] = lam / (lam + eps)
    return f


def dense_sinkhorn(logits, rho, eps=0.1, lam=1.0, iters=200, hard=False):
    """Plain exp-domain scaling, a fixed number of steps, then one u-update; returns N * Q (real part)."""
    log_m, beta = _augmented_kernel(logits, eps, rho)
    n, k = logits.shape
    m = log_m.exp()
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    f = _exponents(k, m.shape[1], eps, lam, hard)
    v = torch.ones(m.shape[1], dtype=torch.float64)
    for _ in range(iters):
        u = a / (m @ v)
        v = (beta / (m.t() @ u)) ** f
    u = a / (m @ v)
    return n * (u[:, None] * m * v)[:, :k]


def logsumexp_sinkhorn(logits, rho, eps=0.1, lam=1.0, iters=200):
    """The same steps on log u, log v by logsumexp: the reference where exp(-C/eps) underflows."""
    log_m, beta = _augmented_kernel(logits, eps, rho)
    n, k = logits.shape
    f = _exponents(k, log_m.shape[1], eps, lam, False)
    log_v = torch.zeros(log_m.shape[1], dtype=torch.float64)
    for _ in range(iters):
        log_u = -math.log(n) - torch.logsumexp(log_m + log_v, 1)
        log_v = f * (beta.log() - torch.logsumexp(log_m + log_u[:, None], 0))
    log_u = -math.log(n) - torch.logsumexp(log_m + log_v, 1)
    return (math.log(n) + log_u[:, None] + log_m + log_v)[:, :k].exp()


def _virtual_mass(logits, state, eps, rho):
    """N * (mass of the virtual column), recomputed from the state's log v alone."""
    log_m, _ = _augmented_kernel(logits, eps, rho)
    log_v = state["log_v"].cpu()
    log_u = -math.log(logits.shape[0]) - torch.logsumexp(log_m + log_v, 1)
    return logits.shape[0] * (log_u + log_v[-1]).exp().sum().item()


# ---------------------------------------------------------------- marginals
@pytest.mark.parametrize("n,k,rho", [(50, 3, 0.1), (200, 10, 0.5), (333, 25, 0.9), (64, 7, 0.999)])
def test_marginals(n, k, rho):
    logits = _logits(n, k, seed=n)
    plan, state = p2ot_plan(logits, rho, **TIGHT)
    assert state["converged"] and state["log_v"].shape == (k + 1,)
    rows = plan.double().sum(1)
    assert plan.min() >= 0 and rows.max() <= 1 + 1e-6
    # rows and the virtual column are hard, so the real mass is rho even with KL-relaxed clusters
    assert rows.sum().item() == pytest.approx(rho * n, rel=1e-6, abs=1e-6)
    virtual = _virtual_mass(logits, state, 0.1, rho)
    assert virtual == pytest.approx((1 - rho) * n, rel=1e-6, abs=1e-6)
    assert rows.sum().item() + virtual == pytest.approx(n, rel=1e-6)  # augmented rows are exact


def test_marginals_at_default_tolerance():
    n, k, rho = 300, 20, 0.3
    plan, state = p2ot_plan(_logits(n, k, seed=1), rho)
    assert state["converged"]
    assert plan.double().sum().item() == pytest.approx(rho * n, rel=1e-4)


def test_soft_marginal_lets_clusters_deviate_but_hard_marginal_is_uniform():
    n, k, rho = 240, 6, 0.4
    logits = _logits(n, k, seed=3)
    soft, _ = p2ot_plan(logits, rho, **TIGHT)
    hard, state = p2ot_plan(logits, rho, hard_marginal=True, **TIGHT)
    target = torch.full((k,), rho * n / k, dtype=torch.float64)
    assert state["converged"]
    assert torch.allclose(hard.double().sum(0), target, rtol=1e-5)
    assert not torch.allclose(soft.double().sum(0), target, rtol=1e-2)
    inf_lam, _ = p2ot_plan(logits, rho, lam=float("inf"), **TIGHT)
    assert torch.equal(inf_lam, hard)
    assert marginal_exponent(0.1, 1.0) == pytest.approx(1 / 1.1) and marginal_exponent(0.1, math.inf) == 1.0


@pytest.mark.parametrize("hard", [False, True])
def test_rho_one_has_unit_rows(hard):
    n, k = 150, 8
    plan, state = p2ot_plan(_logits(n, k, seed=5), 1.0, hard_marginal=hard, **TIGHT)
    assert torch.allclose(plan.double().sum(1), torch.ones(n, dtype=torch.float64), atol=1e-6)
    assert state["log_v"][-1].item() == -math.inf and torch.isfinite(state["log_v"][:k]).all()
    if hard:  # balanced Sinkhorn: N / K per cluster
        assert torch.allclose(plan.double().sum(0), torch.full((k,), n / k, dtype=torch.float64), rtol=1e-5)


# ---------------------------------------------------------------- references
@pytest.mark.parametrize(
    "n,k,rho,lam,hard",
    [(40, 4, 0.3, 1.0, False), (90, 12, 0.7, 0.5, False), (60, 5, 1.0, 1.0, False), (70, 6, 0.2, 1.0, True)],
)
def test_matches_dense_exp_domain_sinkhorn(n, k, rho, lam, hard):
    logits = _logits(n, k, scale=1.0, seed=k, dtype=torch.float64)  # moderate: exp(-C/eps) stays normal
    plan, state = p2ot_plan(logits, rho, lam=lam, hard_marginal=hard, tol=0.0, max_iter=150)
    ref = dense_sinkhorn(logits, rho, lam=lam, iters=150, hard=hard)
    assert state["iterations"] == 150 and not state["converged"]
    assert plan.dtype == torch.float64
    assert torch.allclose(plan, ref, rtol=1e-9, atol=1e-12)


def test_matches_logsumexp_reference_where_the_kernel_underflows(monkeypatch):
    # confident logits and a cluster nobody wants: exp(-C/eps) is 0 in float64 for most entries
    # and that cluster's plan column falls below the kernel floor, so the logsumexp fallback runs.
    n, k, rho = 80, 6, 0.4
    logits = _logits(n, k, scale=60.0, seed=11, dtype=torch.float64)
    logits[:, 0] = -3000.0
    assert (torch.log_softmax(logits, 1) / 0.1 < -745).float().mean() > 0.5
    calls = []
    log_step = p2ot_module._log_step
    monkeypatch.setattr(p2ot_module, "_log_step", lambda *a: calls.append(1) or log_step(*a))
    plan, _ = p2ot_plan(logits, rho, tol=0.0, max_iter=100)
    assert len(calls) > 50  # the fallback really ran
    ref = logsumexp_sinkhorn(logits, rho, iters=100)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan, ref, rtol=1e-9, atol=1e-300)
    plan, state = p2ot_plan(logits, rho)
    assert state["converged"] and plan.sum().item() == pytest.approx(rho * n, rel=1e-5)


def test_reanchoring_keeps_the_same_iterates(monkeypatch):
    # the kernel is re-exponentiated whenever a scaling drifts far from its anchor; force that on
    # almost every step and check the iterates still follow the logsumexp reference
    logits = _logits(120, 9, scale=8.0, seed=13, dtype=torch.float64)
    calls = []
    anchor = p2ot_module._anchor
    monkeypatch.setattr(p2ot_module, "_ANCHOR_DRIFT", 1e-9)
    monkeypatch.setattr(p2ot_module, "_anchor", lambda *a: calls.append(1) or anchor(*a))
    plan, _ = p2ot_plan(logits, 0.3, tol=0.0, max_iter=80)
    assert len(calls) > 40
    assert torch.allclose(plan, logsumexp_sinkhorn(logits, 0.3, iters=80), rtol=1e-9, atol=1e-300)


def _objective(q_aug, c_aug, k, rho, eps, lam):
    """<Q, C> + lam KL(Q^T 1 || rho/K) + eps <Q', log Q' - 1> on the augmented plan (unscaled)."""
    col = q_aug[:, :k].sum(0)
    target = rho / k
    kl = (col * (col / target).log() - col + target).sum()
    ent = torch.where(q_aug > 0, q_aug * (q_aug.log() - 1), torch.zeros_like(q_aug)).sum()
    return (q_aug * c_aug).sum() + lam * kl + eps * ent


def test_plan_beats_feasible_perturbations():
    n, k, rho, eps, lam = 60, 5, 0.5, 0.1, 1.0
    logits = _logits(n, k, scale=2.0, seed=7, dtype=torch.float64)
    plan, _ = p2ot_plan(logits, rho, eps=eps, lam=lam, **TIGHT)
    q = plan / n
    q_aug = torch.cat([q, (1.0 / n - q.sum(1)).clamp_min(0)[:, None]], dim=1)
    c_aug = torch.cat([-torch.log_softmax(logits, 1), torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    best = _objective(q_aug, c_aug, k, rho, eps, lam)
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        # mass moved between real clusters within each row: rows and virtual column unchanged
        z = torch.rand(n, k, generator=g, dtype=torch.float64) * 2 - 1
        e = torch.zeros_like(q_aug)
        e[:, :k] = q * (z - (q * z).sum(1, keepdim=True) / q.sum(1, keepdim=True))
        # mass moved between rows within the virtual column, compensated on each row's real part
        w = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
        qv = q_aug[:, k]
        w = w - (qv * w).sum() / qv.sum()
        e[:, k] += qv * w
        e[:, :k] -= (qv * w)[:, None] * q / q.sum(1, keepdim=True)
        t = 0.5 / ((-e / q_aug).max().item() + 1e-12)  # keeps Q + t E >= 0
        pert = q_aug + t * (0.1 + 0.3 * trial / 5) * e
        assert pert.min() >= 0
        assert torch.allclose(pert.sum(1), q_aug.sum(1))
        assert pert[:, k].sum().item() == pytest.approx(q_aug[:, k].sum().item())
        assert _objective(pert, c_aug, k, rho, eps, lam) > best


# ---------------------------------------------------------------- warm start
def test_warm_start_reaches_same_plan_in_fewer_iterations():
    n, k, rho = 400, 16, 0.35
    logits = _logits(n, k, seed=21)
    _, state = p2ot_plan(logits, rho, tol=1e-9, max_iter=5000)
    moved = logits + 0.05 * _logits(n, k, scale=1.0, seed=22)
    cold, cold_state = p2ot_plan(moved, rho, tol=1e-9, max_iter=5000)
    warm, warm_state = p2ot_plan(moved, rho, tol=1e-9, max_iter=5000, warm_start=state)
    assert cold_state["converged"] and warm_state["converged"]
    assert warm_state["iterations"] < cold_state["iterations"]
    assert torch.allclose(warm, cold, rtol=1e-5, atol=1e-7)
    # across a rho step (the schedule) and from a rho = 1 state whose virtual entry is -inf
    _, one = p2ot_plan(logits, 1.0, tol=1e-9, max_iter=5000)
    again, again_state = p2ot_plan(moved, rho, tol=1e-9, max_iter=5000, warm_start=one["log_v"])
    assert again_state["converged"] and torch.allclose(again, cold, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        p2ot_plan(moved, rho, warm_start=torch.zeros(k))


# ---------------------------------------------------------------- dtypes, devices, inputs
@pytest.mark.parametrize(
    "dtype,out", [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32)]
)
def test_output_dtype(dtype, out):
    plan, state = p2ot_plan(_logits(30, 4, dtype=dtype), 0.5)
    assert plan.dtype == out and state["log_v"].dtype == torch.float64


def test_rejects_bad_inputs():
    x = _logits(10, 3)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            p2ot_plan(x, bad)
    with pytest.raises(ValueError):
        p2ot_plan(x, 0.5, eps=0.0)
    with pytest.raises(ValueError):
        p2ot_plan(torch.full((4, 3), float("nan")), 0.5)
    with pytest.raises(ValueError):
        p2ot_plan(torch.zeros(5), 0.5)


def test_single_cluster_and_no_iterations():
    plan, _ = p2ot_plan(_logits(20, 1), 0.25)
    assert torch.allclose(plan.sum(), torch.tensor(5.0), rtol=1e-5)
    plan, state = p2ot_plan(_logits(20, 4), 0.25, max_iter=0)
    assert state["iterations"] == 0 and not state["converged"]
    assert plan.double().sum(1).max() <= 1 + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits = _logits(500, 30, seed=9)
    cpu, cpu_state = p2ot_plan(logits, 0.3)
    gpu, gpu_state = p2ot_plan(logits.cuda(), 0.3, warm_start=None)
    assert gpu.is_cuda and gpu_state["log_v"].is_cuda
    assert gpu_state["iterations"] == pytest.approx(cpu_state["iterations"], abs=2)
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- schedule
def test_rho_schedule_endpoints_and_monotone():
    rho0, total = 0.1, 1000
    assert rho_schedule(0, total, rho0) == pytest.approx(rho0 + (1 - rho0) * math.exp(-5))
    assert rho_schedule(total, total, rho0) == 1.0
    assert rho_schedule(-5, total, rho0) == rho_schedule(0, total, rho0)
    assert rho_schedule(2 * total, total, rho0) == 1.0
    values = [rho_schedule(t, total, rho0) for t in range(0, total + 1, 10)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert rho_schedule(500, total, 0.2) == pytest.approx(0.2 + 0.8 * math.exp(-1.25))
    with pytest.raises(ValueError):
        rho_schedule(1, 0)
