"""The per-batch method objectives equal their composition from mcscale.objectives, option by option."""

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from mcscale import objectives as obj
from mcscale.config import ClusterConfig, Config, ConfigError, P2OTConfig, validate
from mcscale.methods import METHODS, MethodEntry
from mcscale.methods.base import build_method
from mcscale.methods.base import BatchResult, Method
from mcscale.methods.head_guided import HeadGuided
from mcscale.methods.p2ot import P2OT
from mcscale.methods.selflabel import SelfLabelling
from mcscale.objectives.ops import REFERENCE
from mcscale.objectives.p2ot import p2ot_plan, rho_schedule

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
    result = build_method(Config(cluster=cfg), K, 100).batch_loss(t1, m1, t2, m2)
    expected, _ = obj.confident_cross_entropy(t1, t2, cfg.tau, balance=True)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("options", [{}, {"weight_view": "pseudo"}, {"loss": "cb"}])
def test_gradient_reaches_both_heads_not_pseudo_view(options):
    """The pseudo-label view x2 gives targets only: with x2's logits requiring grad, no gradient flows
    into them, while both heads of the prediction view get the gradient of the hand composition."""
    cfg = _cfg(**options)
    t1, m1, t2, m2 = [x.requires_grad_() for x in _logits(7)]
    method = HeadGuided(cfg, K)
    assert not method.trains_both_views
    result = method.batch_loss(t1, m1, t2, m2)
    got = torch.autograd.grad(result.loss, [t1, m1, t2, m2], allow_unused=True)
    for grad in got[2:]:
        assert grad is None or not grad.any()
    # the reference: the same composition with the pseudo view detached by hand
    expected, _ = _by_hand(cfg, t1, m1, t2.detach(), m2.detach())
    want = torch.autograd.grad(expected, [t1, m1])
    for g, w in zip(got[:2], want):
        assert g is not None and w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- P2OT
def _soft_ce(logits, target):
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def test_p2ot_first_batch_equals_plan_by_hand():
    t1, m1, t2, m2 = _logits(8, scale=2.0)
    method = P2OT(_cfg(method="p2ot"), P2OTConfig(), K, total_steps=50)
    result = method.batch_loss(t1, m1, t2, m2, step=10)
    rho = rho_schedule(10, 50, 0.1)
    q_for_1, _ = p2ot_plan(t2, rho)  # cold start: the first solve of the step
    q_for_2, _ = p2ot_plan(t1, rho, warm_start=p2ot_plan(t2, rho)[1])
    expected = 0.5 * (_soft_ce(t1, q_for_1) + _soft_ce(t2, q_for_2))
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.stats["rho"] == pytest.approx(rho)
    assert result.stats["ot_mass"] == pytest.approx(rho, abs=1e-4)


def test_p2ot_buffer_is_a_fifo_of_batches_and_survives_checkpoints():
    method = P2OT(_cfg(method="p2ot"), P2OTConfig(buffer_batches=2), K, total_steps=50)
    batches = [_logits(s, scale=2.0) for s in (10, 11, 12)]
    # what the FIFO holds after each step: the prediction view's logits, oldest first, at most 2 batches
    expected_buffers = [batches[0][0], torch.cat([batches[0][0], batches[1][0]]),
                        torch.cat([batches[1][0], batches[2][0]])]
    for step, ((t1, m1, t2, m2), expected) in enumerate(zip(batches, expected_buffers)):
        method.batch_loss(t1, m1, t2, m2, step=step)
        assert torch.equal(method.buffer, expected), step
    # through a real checkpoint (torch.save, weights-only load) the buffer and warm start come back equal
    saved = io.BytesIO()
    torch.save(method.state_dict(), saved)
    saved.seek(0)
    restored = P2OT(_cfg(method="p2ot"), P2OTConfig(buffer_batches=2), K, total_steps=50)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert torch.equal(restored.buffer, expected_buffers[-1])
    assert torch.equal(restored.warm, method.warm) and restored.warm.shape == (K + 1,)
    warm = method.warm.clone()
    # with a full buffer each plan is solved over [buffer; batch] and its last N rows are the targets
    t1, m1, t2, m2 = _logits(13, scale=2.0)
    a = method.batch_loss(t1, m1, t2, m2, step=3).loss
    b = restored.batch_loss(t1, m1, t2, m2, step=3).loss
    assert a.item() == b.item()
    rho = rho_schedule(3, 50, 0.1)
    buffer = expected_buffers[-1]
    plan_2, state_2 = p2ot_plan(torch.cat([buffer, t2]), rho, warm_start=warm)
    plan_1, _ = p2ot_plan(torch.cat([buffer, t1]), rho, warm_start=state_2)
    expected = 0.5 * (_soft_ce(t1, plan_2[-N:]) + _soft_ce(t2, plan_1[-N:]))
    assert a.item() == pytest.approx(expected.item(), rel=1e-5)
    # and the oldest batch leaves the FIFO on both
    for m in (method, restored):
        assert torch.equal(m.buffer, torch.cat([batches[2][0], t1]))


def test_p2ot_variants_choose_rho():
    cfg = _cfg(method="p2ot")
    assert P2OT(cfg, P2OTConfig(variant="uot"), K, 10).rho(0) == 1.0
    assert P2OT(cfg, P2OTConfig(rho_schedule="fixed", rho0=0.3), K, 10).rho(7) == 0.3
    assert P2OT(cfg, P2OTConfig(), K, 10).rho(10) == 1.0
    pot = P2OT(cfg, P2OTConfig(variant="pot"), K, 10)
    t1, m1, t2, m2 = _logits(14, scale=2.0)
    target, _ = pot.targets(t2, 0.5)
    # hard uniform marginal: every cluster gets rho * N / K
    assert torch.allclose(target.sum(0), torch.full((K,), 0.5 * N / K), rtol=1e-3)


def test_p2ot_with_mini_weights_adds_the_mini_head_losses():
    t1, m1, t2, m2 = _logits(15, scale=2.0)
    cfg = _cfg(method="p2ot")
    plain = P2OT(cfg, P2OTConfig(), K, 50).batch_loss(t1, m1, t2, m2, step=5)
    mini = P2OT(cfg, P2OTConfig(mini_weights=True), K, 50).batch_loss(t1, m1, t2, m2, step=5)
    w = obj.class_weights(obj.contingency(t1.argmax(1), m1.argmax(1), K, M), cfg.delta, "mini")
    assert torch.equal(mini.weights, w)
    assert len(set(w.tolist())) > 1  # unequal weights, so the re-weighting shows in the value
    # by hand: the swapped plans, each sample's soft CE weighted by the weight of its target's argmax,
    # plus alpha L_m + beta L_s of the mini-cluster head
    rho = rho_schedule(5, 50, 0.1)
    q_for_1, state = p2ot_plan(t2, rho)
    q_for_2, _ = p2ot_plan(t1, rho, warm_start=state)

    def weighted_soft_ce(logits, target):
        per_sample = -(target * F.log_softmax(logits, 1)).sum(1)
        sample_w = w[target.argmax(1)]
        return (sample_w * per_sample).sum() / sample_w.sum()

    l_r = 0.5 * (weighted_soft_ce(t1, q_for_1) + weighted_soft_ce(t2, q_for_2))
    l_m, n_m = obj.confident_cross_entropy(m1, m2, cfg.tau, balance=cfg.aux_balance)
    l_s = obj.similarity_alignment(t1.softmax(1), m1.softmax(1), cfg.similarity_normalize_rows)
    assert n_m > 0 and mini.stats["n_confident_m"] == n_m
    assert mini.stats["l_r"] == pytest.approx(l_r.item(), rel=1e-5)
    assert mini.stats["l_m"] == pytest.approx(l_m.item(), rel=1e-5)
    assert mini.stats["l_s"] == pytest.approx(l_s.item(), rel=1e-5)
    assert mini.loss.item() == pytest.approx((l_r + cfg.alpha * l_m + cfg.beta * l_s).item(), rel=1e-5)
    # without mini weights: the unweighted plan loss alone
    unweighted = 0.5 * (_soft_ce(t1, q_for_1) + _soft_ce(t2, q_for_2))
    assert plain.loss.item() == pytest.approx(unweighted.item(), rel=1e-5)
    assert abs(l_r.item() - unweighted.item()) > 1e-3  # the weighting is visible at this tolerance


# ---------------------------------------------------------------- the registry: a method is one class + one entry
class ToyMethod(Method):
    """A toy method: the class-balanced CE of the target head on the argmax of x2 (no threshold)."""

    calls = 0

    def batch_loss(self, logits_t1, logits_m1, logits_t2, logits_m2, step: int = 0) -> BatchResult:
        ToyMethod.calls += 1
        loss, n = self.ops.confident_cross_entropy(logits_t1, logits_t2, 0.0, balance=True)
        return BatchResult(loss, {"l_r": float(loss.detach()), "n_confident_t": n})


TOY = MethodEntry("toy", "Toy", f"{__name__}:ToyMethod")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", TOY)
    monkeypatch.setattr(ToyMethod, "calls", 0)


def test_registry_lists_the_methods_and_what_stages_need():
    assert list(METHODS) == ["mini", "maxi", "selflabel", "p2ot"]
    assert {name: entry.load().__name__ for name, entry in METHODS.items()} == {
        "mini": "HeadGuided", "maxi": "HeadGuided", "selflabel": "SelfLabelling", "p2ot": "P2OT"}
    modes = {}
    for method, mini_weights in (("mini", False), ("maxi", False), ("selflabel", True), ("p2ot", False), ("p2ot", True)):
        cfg = Config(cluster=ClusterConfig(method=method), p2ot=P2OTConfig(mini_weights=mini_weights, cosine_head=True))
        entry = METHODS[method]
        modes[method, mini_weights] = (entry.weight_mode(cfg), entry.cosine_head(cfg), entry.display_name(cfg))
    assert modes == {
        ("mini", False): ("mini", False, "mini"), ("maxi", False): ("maxi", False, "maxi"),
        ("selflabel", True): (None, False, "selflabel"), ("p2ot", False): (None, True, "p2ot"),
        ("p2ot", True): ("mini", True, "p2ot+mini"),
    }
    assert METHODS["p2ot"].cosine_scale(cfg) == cfg.p2ot.cosine_scale and METHODS["mini"].cosine_scale(cfg) is None
    # a run folder's raw config.yaml reads the same
    assert METHODS["p2ot"].display_name({"cluster": {"method": "p2ot"}, "p2ot": {"mini_weights": True}}) == "p2ot+mini"
    assert METHODS["p2ot"].display_name({"cluster": {"method": "p2ot"}}) == "p2ot"


def test_a_toy_method_is_built_from_its_registry_entry(toy):
    cfg = Config(cluster=ClusterConfig(method="toy", num_clusters=K, num_aux=M))
    validate(cfg)  # the registry is what validate checks cluster.method against
    method = build_method(cfg, K, 10)
    assert type(method) is ToyMethod and method.ops is REFERENCE and method.num_clusters == K
    t1, m1, t2, m2 = _logits(11)
    result = method.batch_loss(t1, m1, t2, m2)
    expected, n = obj.confident_cross_entropy(t1, t2, 0.0, balance=True)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6) and n == N
    with pytest.raises(ConfigError, match="cluster.method: 'toy2' is not one of mini, maxi, selflabel, p2ot, toy$"):
        validate(Config(cluster=ClusterConfig(method="toy2")))


TINY = ["--config", "digits_lt", "--cpu", "--batch-size", "32", "model.proj_hidden=16", "model.proj_dim=8",
        "logging.report=false"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    from mcscale.cli import main

    out = tmp_path_factory.mktemp("encoder")
    assert main(["pretrain", *TINY, "--max-steps", "2", "--out", str(out)]) == 0
    return out


def test_a_toy_method_trains_through_mcscale_cluster(toy, encoder_dir, tmp_path):
    import json

    from mcscale.cli import main
    from mcscale.report.tables import _read

    out = tmp_path / "toy"
    assert main(["cluster", *TINY, "--encoder", str(encoder_dir), "--out", str(out), "--max-steps", "3",
                 "cluster.method=toy", "cluster.eval_every=0"]) == 0
    assert ToyMethod.calls == 3
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "eval" not in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["n_confident_t"] == 32 for r in train)
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["steps"] == 3 and "weight_spearman" not in final  # the toy estimates no weights
    assert _read(out)[0] == "toy"
