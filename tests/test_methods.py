"""The per-batch method objectives equal their composition from mcscale.objectives, option by option."""

import dataclasses

import pytest
import torch

from mcscale import objectives as obj
from mcscale.config import ClusterConfig
from mcscale.methods import HeadGuided, SelfLabelling, build_method

K, M, N = 4, 9, 33


def _logits(seed, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, d, generator=g) * scale for d in (K, M, K, M)]


def _cfg(**kw):
    return dataclasses.replace(ClusterConfig(num_clusters=K, num_aux=M, tau=0.7), **kw)


def _by_hand(cfg, t1, m1, t2, m2):
    a, b = (t1, m1) if cfg.weight_view == "prediction" else (t2, m2)
    m = cfg.num_aux
    w = obj.class_weights(obj.contingency(a.argmax(1), b.argmax(1), K, m), cfg.delta, cfg.method)
    if cfg.loss == "ce":
        l_r, _ = obj.confident_cross_entropy(t1, t2, cfg.tau, w, normalize=cfg.target_normalize)
    else:
        conf, y = t2.softmax(1).max(1)
        l_r = obj.long_tail_cross_entropy(t1, y, m / w, cfg.loss, cfg.cb_gamma, conf > cfg.tau, num_aux=m)
    l_m, _ = obj.confident_cross_entropy(m1, m2, cfg.tau, balance=cfg.aux_balance)
    l_s = obj.similarity_alignment(t1.softmax(1), m1.softmax(1), cfg.similarity_normalize_rows)
    return l_r + cfg.alpha * l_m + cfg.beta * l_s, w


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_view": "pseudo"},
        {"target_normalize": "count", "aux_balance": False, "similarity_normalize_rows": False},
        {"loss": "cb"},
        {"loss": "balms"},
        {"loss": "eql"},
        {"method": "maxi", "num_aux": 3},
    ],
)
def test_head_guided_equals_hand_composition(options):
    cfg = _cfg(**options)
    t1, m1, t2, m2 = _logits(1)
    m1, m2 = m1[:, : cfg.num_aux], m2[:, : cfg.num_aux]
    result = HeadGuided(cfg, K).batch_loss(t1, m1, t2, m2)
    expected, w = _by_hand(cfg, t1, m1, t2, m2)
    assert result.loss is not None
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.equal(result.weights, w)
    assert result.stats["n_confident_t"] == int((t2.softmax(1).max(1).values > cfg.tau).sum())


def test_batch_without_confident_samples_is_skipped():
    t1, m1, t2, m2 = _logits(2, scale=0.01)  # nearly uniform: nobody passes tau 0.7
    result = HeadGuided(_cfg(), K).batch_loss(t1, m1, t2, m2)
    assert result.loss is None and result.stats["n_confident_t"] == 0
    assert SelfLabelling(_cfg(), K).batch_loss(t1, m1, t2, m2).loss is None


def test_window_estimate_sums_recent_counts():
    cfg = _cfg(weight_estimate="window", weight_window=2)
    method = HeadGuided(cfg, K)
    batches = [_logits(s) for s in (3, 4, 5)]
    for t1, m1, t2, m2 in batches:
        result = method.batch_loss(t1, m1, t2, m2)
    counts = sum(obj.contingency(b[0].argmax(1), b[1].argmax(1), K, M) for b in batches[1:])
    assert torch.equal(result.weights, obj.class_weights(counts, cfg.delta, "mini"))
    # the window survives a checkpoint round trip
    restored = HeadGuided(cfg, K)
    restored.load_state_dict(method.state_dict())
    assert [torch.equal(a, b) for a, b in zip(restored.recent_counts, method.recent_counts)] == [True, True]


def test_selflabel_is_balanced_confident_ce():
    t1, m1, t2, m2 = _logits(6)
    cfg = _cfg(method="selflabel")
    result = build_method(cfg, K).batch_loss(t1, m1, t2, m2)
    expected, _ = obj.confident_cross_entropy(t1, t2, cfg.tau, balance=True)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_reaches_both_heads_not_pseudo_view():
    t1, m1, t2, m2 = [x.requires_grad_() for x in _logits(7)]
    result = HeadGuided(_cfg(), K).batch_loss(t1, m1, t2.detach(), m2.detach())
    result.loss.backward()
    assert t1.grad.abs().sum() > 0 and m1.grad.abs().sum() > 0
