"""mcscale.kernels.head_objective (the fused head objective) against HeadGuided over mcscale.objectives.

Interpreter setup as in test_kernels.py: TRITON_INTERPRET is set before triton is first imported;
when an earlier test module already imported triton in compiled mode, only the runner test is
collected and it runs this file in a fresh process. With a GPU the compiled kernels run on CUDA.
"""

import os

import torch  # importing torch alone does not import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
from _support import run_file_in_fresh_interpreter_mode  # noqa: E402

import mcscale.kernels as mk  # noqa: E402
from mcscale.config import ClusterConfig  # noqa: E402
from mcscale.kernels import _runtime  # noqa: E402
from mcscale.methods.head_guided import HeadGuided  # noqa: E402
from mcscale.objectives.ops import REFERENCE, TritonOps  # noqa: E402

fused = importlib.import_module("mcscale.kernels.fused")
NEEDS_FRESH_PROCESS = DEVICE == "cpu" and not _runtime.interpreting()


def test_head_objective_in_fresh_process():
    if not NEEDS_FRESH_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_fresh_interpreter_mode(__file__)


# ---------------------------------------------------------------- inputs and the reference
def _logits(n, k, m, seed, scale=(3.0, 3.0, 5.0, 5.0)):
    """float64 logits (t1, m1, t2, m2); with n >= 4, labels on the first and last clusters and ties."""
    g = torch.Generator().manual_seed(seed)
    lt1, lm1, lt2, lm2 = (torch.randn(n, w, generator=g, dtype=torch.float64) * s
                          for w, s in zip((k, m, k, m), scale))
    if n >= 4:
        lt2[0], lm2[0] = 0.0, 0.0
        lt2[0, 0], lm2[0, m - 1] = 30.0, 30.0  # confident on the first / last cluster
        lt2[1], lm2[1] = 0.0, 0.0
        lt2[1, k - 1], lm2[1, 0] = 30.0, 30.0
        lt2[2], lm2[2] = 0.0, 0.0
        lt2[2, :2], lm2[2, :2] = 30.0, 30.0  # a tie: label 0 with confidence 0.5
        lt1[2], lm1[2] = 0.0, 0.0  # all equal: the count labels are the first clusters
        lt1[3], lm1[3] = 0.0, 0.0
        lt1[3, k - 1], lm1[3, m - 1] = 9.0, 9.0  # the last cell of the contingency matrix
    return lt1, lm1, lt2, lm2


def _config(k, m, **overrides):
    method = "mini" if m > k else "maxi"
    return ClusterConfig(method=method, num_clusters=k, num_aux=m, tau=0.45, delta=0.3, alpha=0.2, beta=0.5,
                         **overrides)


def _reference(cfg, k, logits, dtype):
    """HeadGuided's composition over mcscale.objectives; the loss also when the batch would be skipped."""
    x = [t.to(dtype).requires_grad_(i < 2) for i, t in enumerate(logits)]
    method = HeadGuided(cfg, k, REFERENCE)
    label_source = (x[0], x[1]) if cfg.weight_view == "prediction" else (x[2], x[3])
    weights = method.estimate_weights(*label_source)
    l_r, n_t = method.target_loss(x[0], x[2], weights)
    aux, stats = method.aux_losses(x[0], x[1], x[3])
    loss = l_r + aux
    loss.backward()
    stats = {"l_r": float(l_r.detach()), "n_confident_t": n_t, **stats}
    return loss.detach(), stats, weights, method.recent_counts[-1], x[0].grad, x[1].grad


def _fused(cfg, logits, dtype):
    x = [t.to(dtype).to(DEVICE).requires_grad_(i < 2) for i, t in enumerate(logits)]
    before = mk.launch_count()
    out = mk.head_objective(
        *x, tau=cfg.tau, delta=cfg.delta, alpha=cfg.alpha, beta=cfg.beta, mode=cfg.method,
        weight_view=cfg.weight_view, target_normalize=cfg.target_normalize, aux_balance=cfg.aux_balance,
        normalize_rows=cfg.similarity_normalize_rows,
    )
    out.loss.backward()
    launches = mk.launch_count() - before
    return out.loss.detach().cpu(), out.values(), out.weights.cpu(), out.counts.cpu(), x[0].grad.cpu(), \
        x[1].grad.cpu(), launches


TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-6, 1e-6), torch.bfloat16: (1e-4, 1e-2)}


def _compare(cfg, k, logits, dtype):
    ref = _reference(cfg, k, logits, dtype)
    got = _fused(cfg, logits, dtype)
    rtol, gtol = TOLERANCES[dtype]
    assert got[1]["n_confident_t"] == ref[1]["n_confident_t"]
    assert got[1]["n_confident_m"] == ref[1]["n_confident_m"]
    assert torch.equal(got[2], ref[2]) and got[2].dtype == torch.float32
    assert torch.equal(got[3], ref[3].cpu()) and got[3].dtype == torch.long
    for key in ("l_r", "l_m"):
        assert got[1][key] == pytest.approx(ref[1][key], rel=rtol, abs=1e-7), key
    assert got[1]["l_s"] == pytest.approx(ref[1]["l_s"], rel=10 * rtol, abs=1e-6)
    assert got[0].dtype == ref[0].dtype
    assert got[0].item() == pytest.approx(ref[0].item(), rel=10 * rtol, abs=1e-6)
    for mine, theirs in ((got[4], ref[4]), (got[5], ref[5])):
        assert mine.dtype == theirs.dtype
        scale = max(theirs.abs().max().item(), 1e-12)
        assert torch.allclose(mine.double(), theirs.double(), rtol=0, atol=gtol * scale)
    return ref, got


def _use_path(monkeypatch, path):
    """tile: K + M in one tile; chunked: rows read in 16-column chunks; wide: the K + M > 128 path (a
    Gram-tile launch before the finish, D scratch), forced at small sizes by shrinking the tile limits.
    3 launches a step on the tile and chunked paths, 4 on the wide one (``_launches_per_step``)."""
    if path in ("chunked", "wide"):
        monkeypatch.setattr(fused, "CHUNK", 16)
    if path == "wide":
        monkeypatch.setattr(fused, "SMALL_WIDTH", 0)
        monkeypatch.setattr(fused, "GRAM_TILE", 16)
        monkeypatch.setattr(fused, "GRAD_TILE_P", 16)
        monkeypatch.setattr(fused, "GRAD_TILE_Q", 16)


def _launches_per_step(path):
    return fused.LAUNCHES_PER_STEP["wide" if path == "wide" else "fused"]


def _cases(every_path, tile_only=()):
    return [(p, *c) for c in every_path for p in ("tile", "chunked", "wide")] + [("tile", *c) for c in tile_only]


# ---------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("path,n,k,m", _cases([(37, 10, 40), (37, 40, 7), (1, 3, 7)], [(37, 3, 7)])
                         + [("wide", 256, 10, 40), ("tile", 256, 10, 40)])
def test_matches_reference_fp32(monkeypatch, path, n, k, m):
    _use_path(monkeypatch, path)
    cfg = _config(k, m)
    ref, got = _compare(cfg, k, _logits(n, k, m, seed=n + k + m), torch.float32)
    if n > 4:
        assert ref[1]["n_confident_t"] > 2 and ref[1]["n_confident_m"] > 2
    assert got[6] == _launches_per_step(path) == (4 if path == "wide" else 3)


@pytest.mark.parametrize("path,k,m", [("tile", 10, 40), ("tile", 40, 7), ("chunked", 40, 7), ("wide", 10, 40)])
def test_matches_reference_bf16_and_fp64(monkeypatch, path, k, m):
    _use_path(monkeypatch, path)
    for dtype in (torch.bfloat16, torch.float64):
        _compare(_config(k, m), k, _logits(37, k, m, seed=3), dtype)


ALL_OTHER = dict(weight_view="pseudo", target_normalize="count", aux_balance=False, similarity_normalize_rows=False)


@pytest.mark.parametrize("path,options", [
    ("tile", dict(weight_view="pseudo")),
    ("tile", dict(target_normalize="count")),
    ("tile", dict(aux_balance=False)),
    ("tile", dict(similarity_normalize_rows=False)),
    ("tile", ALL_OTHER), ("chunked", ALL_OTHER), ("wide", ALL_OTHER),
])
def test_every_option(monkeypatch, path, options):
    _use_path(monkeypatch, path)
    for k, m in ((10, 40), (40, 7)):
        _compare(_config(k, m, **options), k, _logits(37, k, m, seed=5), torch.float32)


@pytest.mark.parametrize("k,m", [(100, 40), (150, 20)])
def test_wide_heads_at_their_own_tile_sizes(k, m):
    """K + M > 128 without shrunk tiles: Gram tiles of 64, 128-column chunks, 4 launches a step."""
    ref, got = _compare(_config(k, m), k, _logits(24, k, m, seed=k), torch.float32)
    assert got[6] == 4 == fused.LAUNCHES_PER_STEP["wide"]


def test_strided_inputs():
    lt1, lm1, lt2, lm2 = _logits(37, 10, 40, seed=8)
    # Column-major and sliced views: the kernels take strides, the reference does not care.
    logits = (lt1.T.contiguous().T, torch.cat([lm1, lm1], 1)[:, ::2], lt2, lm2.T.contiguous().T)
    _compare(_config(10, 40), 10, logits, torch.float32)


# ---------------------------------------------------------------- empty confident sets
@pytest.mark.parametrize("path,empty", [("tile", "both"), ("tile", "target"), ("tile", "aux"), ("wide", "both")])
def test_empty_confident_set(monkeypatch, path, empty):
    _use_path(monkeypatch, path)
    k, m = 10, 40
    logits = list(_logits(37, k, m, seed=9, scale=(3.0, 3.0, 0.1, 0.1)))  # nothing above tau = 0.45 ...
    logits[2][:3] *= 1e-3  # ... once the planted confident rows are flattened too
    logits[3][:3] *= 1e-3
    if empty == "aux":
        logits[2] = logits[2] * 300
    if empty == "target":
        logits[3] = logits[3] * 300
    cfg = _config(k, m)
    ref, got = _compare(cfg, k, logits, torch.float32)
    stats = got[1]
    assert (stats["n_confident_t"] == 0) == (empty in ("both", "target"))
    assert (stats["n_confident_m"] == 0) == (empty in ("both", "aux"))
    if stats["n_confident_t"] == 0:
        assert stats["l_r"] == 0.0
    if stats["n_confident_m"] == 0:
        assert stats["l_m"] == 0.0
    # HeadGuided skips such a batch, on either path.
    x = [t.float().to(DEVICE) for t in logits]
    assert HeadGuided(cfg, k, TritonOps()).batch_loss(*x).loss is None
    assert HeadGuided(cfg, k, REFERENCE).batch_loss(*[t.cpu() for t in x]).loss is None


# ---------------------------------------------------------------- launches, wiring, errors
@pytest.mark.parametrize("path", ["tile", "wide"])
def test_launch_count_of_a_step(monkeypatch, path):
    """Launches of a whole step (forward + backward): 3 when K + M <= 128, 4 on the wide path (a
    Gram-tile launch, 5 x 5 programs here, before the one-program finish).

    Each path runs twice: no state is kept between calls, so the second step must equal the first.
    """
    _use_path(monkeypatch, path)
    logits = [t.float().to(DEVICE) for t in _logits(64, 30, 40, seed=1)]
    logits[0].requires_grad_()
    logits[1].requires_grad_()
    results = []
    for _ in range(2):
        before = mk.launch_count()
        out = mk.head_objective(*logits, tau=0.45, delta=0.3, alpha=0.2, beta=0.5)
        forward = mk.launch_count() - before
        out.loss.backward()
        expected = (3, 4) if path == "wide" else (2, 3)
        assert (forward, mk.launch_count() - before) == expected
        assert expected[1] == _launches_per_step(path)
        results.append((out.stats.cpu(), out.weights.cpu(), logits[0].grad.cpu().clone()))
        logits[0].grad = logits[1].grad = None
    (stats, weights, grad), (stats2, weights2, grad2) = results  # float atomics: not bitwise on a GPU
    assert torch.equal(weights, weights2) and torch.allclose(stats, stats2, rtol=1e-6, atol=0)
    assert torch.allclose(grad, grad2, rtol=0, atol=1e-6 * grad.abs().max().item())


def test_head_guided_uses_the_fused_path():
    k, m = 10, 40
    cfg = _config(k, m)
    logits = _logits(37, k, m, seed=2)
    results = {}
    for name, ops, device in (("fused", TritonOps(), DEVICE), ("ref", REFERENCE, "cpu")):
        x = [t.float().to(device).requires_grad_(i < 2) for i, t in enumerate(logits)]
        method = HeadGuided(cfg, k, ops)
        before = mk.launch_count()
        result = method.batch_loss(*x)
        result.loss.backward()
        results[name] = (result, mk.launch_count() - before, method.state_dict(), x[0].grad.cpu())
    (fused_result, launches, state, grad), (ref_result, _, ref_state, ref_grad) = results["fused"], results["ref"]
    assert launches == 3
    assert fused_result.stats.keys() == ref_result.stats.keys()
    for key, value in ref_result.stats.items():
        assert fused_result.stats[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert torch.equal(fused_result.weights.cpu(), ref_result.weights)
    assert torch.equal(state["recent_counts"][0], ref_state["recent_counts"][0])
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("overrides", [dict(weight_estimate="window"), dict(loss="cb")])
def test_head_guided_keeps_the_composed_path_otherwise(overrides):
    k, m = 10, 40
    cfg = _config(k, m, **overrides)
    x = [t.float().to(DEVICE).requires_grad_(i < 2) for i, t in enumerate(_logits(37, k, m, seed=4))]
    before = mk.launch_count()
    result = HeadGuided(cfg, k, TritonOps()).batch_loss(*x)
    assert mk.launch_count() - before > 3  # the per-op kernels
    ref = HeadGuided(cfg, k, REFERENCE).batch_loss(*[t.detach().cpu() for t in x])
    assert result.stats["l_r"] == pytest.approx(ref.stats["l_r"], rel=1e-5)
    assert torch.equal(result.weights.cpu(), ref.weights)


def test_pseudo_view_gets_no_gradient_and_errors():
    x = [t.float().to(DEVICE).requires_grad_() for t in _logits(8, 3, 7, seed=6)]
    out = mk.head_objective(*x, tau=0.45, delta=0.3, alpha=0.2, beta=0.5)
    out.loss.backward()
    assert x[0].grad is not None and x[1].grad is not None
    assert x[2].grad is None and x[3].grad is None
    good = dict(tau=0.45, delta=0.3, alpha=0.2, beta=0.5)
    for bad in (dict(mode="midi"), dict(weight_view="x3"), dict(target_normalize="mean")):
        with pytest.raises(ValueError):
            mk.head_objective(*x, **good, **bad)
    with pytest.raises(ValueError):
        mk.head_objective(x[0], x[1], x[1], x[0], **good)
    with pytest.raises(ValueError):
        mk.head_objective(x[0][:0], x[1][:0], x[2][:0], x[3][:0], **good)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    x = torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mk.head_objective(x, x, x, x, tau=0.5, delta=0.3, alpha=1.0, beta=1.0)


if NEEDS_FRESH_PROCESS:  # only the runner above is collected here; the rest runs in its subprocess
    for _name in [name for name in globals() if name.startswith("test_")]:
        if _name != "test_head_objective_in_fresh_process":
            del globals()[_name]
