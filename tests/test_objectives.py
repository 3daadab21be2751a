"""The objectives of METHOD.md against hand-worked cases and plain reference implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from mcscale import objectives as obj


# ---------------------------------------------------------------- contingency
def test_contingency_hand_case():
    a = torch.tensor([0, 0, 1, 2, 2, 2])
    b = torch.tensor([1, 1, 0, 3, 3, 0])
    t = obj.contingency(a, b, 3, 4)
    expected = torch.tensor([[0, 2, 0, 0], [1, 0, 0, 0], [1, 0, 0, 2]])
    assert t.dtype == torch.long
    assert torch.equal(t, expected)


@pytest.mark.parametrize("n,k,m", [(1, 3, 7), (37, 10, 40), (513, 7, 3)])
def test_contingency_matches_loop(n, k, m):
    g = torch.Generator().manual_seed(n)
    a = torch.randint(0, k, (n,), generator=g)
    b = torch.randint(0, m, (n,), generator=g)
    ref = torch.zeros(k, m, dtype=torch.long)
    for i in range(n):
        ref[a[i], b[i]] += 1
    assert torch.equal(obj.contingency(a, b, k, m), ref)


def test_contingency_rejects_out_of_range_label():
    with pytest.raises(ValueError):
        obj.contingency(torch.tensor([0, 3]), torch.tensor([0, 0]), 3, 2)


# ---------------------------------------------------------------- class weights
def _counts_owning(owners, num_target, per_column=5):
    """Each mini-cluster j fully owned by target cluster owners[j]."""
    t = torch.zeros(num_target, len(owners), dtype=torch.long)
    for j, k in enumerate(owners):
        t[k, j] = per_column
    return t


def test_mini_weights_unowned_cluster_gets_2m():
    # K=3, M=6: clusters 0 and 1 own 4 and 2 mini-clusters; cluster 2 owns none.
    counts = _counts_owning([0, 0, 0, 0, 1, 1], 3)
    w = obj.class_weights(counts, delta=0.5, mode="mini")
    # cluster 2 owns nothing -> 6 / 0.5 = 12 = 2M
    assert torch.allclose(w, torch.tensor([1.5, 3.0, 12.0]))
    counts7 = _counts_owning([0, 0, 0, 0, 1, 1, 2], 3)
    assert torch.allclose(obj.class_weights(counts7, 0.5, "mini"), torch.tensor([7 / 4, 7 / 2, 7.0]))


def test_mini_weights_four_two_one_gives_1_5_3_6():
    # M = 6 mini-clusters; the last is split 50/50 between clusters 0 and 2: with delta 0.3 both own it.
    counts = torch.tensor(
        [[5, 5, 5, 0, 0, 2], [0, 0, 0, 4, 4, 0], [0, 0, 0, 0, 0, 2]], dtype=torch.long
    )
    w = obj.class_weights(counts, delta=0.3, mode="mini")
    assert torch.allclose(w, torch.tensor([6 / 4, 6 / 2, 6 / 1]))


def test_mini_threshold_is_strict_and_empty_column_counts_nothing():
    # column 0: shares 0.5/0.5 -> with delta 0.5 nobody owns it (strict >); column 1 empty.
    counts = torch.tensor([[3, 0], [3, 0]])
    w = obj.class_weights(counts, delta=0.5, mode="mini")
    assert torch.allclose(w, torch.tensor([4.0, 4.0]))  # 2 / 0.5
    w = obj.class_weights(counts, delta=0.49, mode="mini")
    assert torch.allclose(w, torch.tensor([2.0, 2.0]))


def test_maxi_weights_rows():
    # K=3 clusters, M=4 maxi-clusters. Row 0 spread over 3 columns, row 1 in one, row 2 empty.
    counts = torch.tensor([[3, 3, 4, 0], [0, 0, 0, 9], [0, 0, 0, 0]])
    w = obj.class_weights(counts, delta=0.25, mode="maxi")
    assert torch.allclose(w, torch.tensor([3.0, 1.0, 0.5]))
    w = obj.class_weights(counts, delta=0.3, mode="maxi")  # 0.3 is not > 0.3
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.5]))


def test_class_weights_reference_loop_random():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        k, m = int(torch.randint(2, 8, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        counts = torch.randint(0, 4, (k, m), generator=g)
        delta = float(torch.rand(1, generator=g)) * 0.8
        for mode in ("mini", "maxi"):
            ref = []
            for r in range(k):
                owned = 0
                for c in range(m):
                    total = counts[:, c].sum() if mode == "mini" else counts[r, :].sum()
                    if total > 0 and counts[r, c].item() / total.item() > delta:
                        owned += 1
                ref.append(m / max(owned, 0.5) if mode == "mini" else max(owned, 0.5))
            got = obj.class_weights(counts, delta, mode)
            assert torch.allclose(got, torch.tensor(ref, dtype=torch.float32)), (trial, mode)


def test_class_weights_bad_mode():
    with pytest.raises(ValueError):
        obj.class_weights(torch.ones(2, 2), 0.3, mode="midi")


# ---------------------------------------------------------------- confident cross-entropy
def _reference_confident_ce(logits, pseudo_logits, tau, w=None, balance=False, normalize="weight_sum"):
    probs = torch.softmax(pseudo_logits.double(), 1)
    total, denom, selected = 0.0, 0.0, []
    for i in range(logits.shape[0]):
        if probs[i].max() > tau:
            selected.append((i, int(probs[i].argmax())))
    if not selected:
        return 0.0, 0
    per_class = {}
    for _, y in selected:
        per_class[y] = per_class.get(y, 0) + 1
    for i, y in selected:
        weight = 1.0 if w is None else float(w[y])
        if balance:
            weight *= len(selected) / per_class[y]
        ls = logits[i].double()
        nll = -(ls[y] - torch.logsumexp(ls, 0)).item()
        total += weight * nll
        denom += weight
    if normalize == "count":
        denom = len(selected)
    return total / denom, len(selected)


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("normalize", ["weight_sum", "count"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_confident_ce_matches_reference(balance, normalize, with_weight):
    g = torch.Generator().manual_seed(3)
    n, k = 37, 5
    logits = torch.randn(n, k, generator=g) * 2
    pseudo = torch.randn(n, k, generator=g) * 3
    w = torch.rand(k, generator=g) * 4 + 0.5 if with_weight else None
    loss, num = obj.confident_cross_entropy(logits, pseudo, 0.6, w, balance, normalize)
    ref, ref_num = _reference_confident_ce(logits, pseudo, 0.6, w, balance, normalize)
    assert num == ref_num > 0
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_confident_ce_hand_case():
    # two samples, both confident on class 0 and 1; logits uniform -> CE = log 2 each.
    logits = torch.zeros(2, 2)
    pseudo = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    w = torch.tensor([1.0, 3.0])
    loss, num = obj.confident_cross_entropy(logits, pseudo, 0.99, w)
    assert num == 2 and loss.item() == pytest.approx(math.log(2))
    loss, _ = obj.confident_cross_entropy(logits, pseudo, 0.99, w, normalize="count")
    assert loss.item() == pytest.approx(4 * math.log(2) / 2)


def test_confident_ce_threshold_is_strict():
    pseudo = torch.tensor([[0.0, 0.0]])  # confidence exactly 0.5
    _, num = obj.confident_cross_entropy(torch.zeros(1, 2), pseudo, 0.5)
    assert num == 0


def test_confident_ce_empty_set_is_connected_zero():
    logits = torch.randn(4, 3, requires_grad=True)
    loss, num = obj.confident_cross_entropy(logits, torch.zeros(4, 3), 0.99)
    assert num == 0 and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_confident_ce_pseudo_logits_get_no_gradient():
    logits = torch.randn(6, 3, requires_grad=True)
    pseudo = (torch.randn(6, 3) * 5).requires_grad_()
    loss, _ = obj.confident_cross_entropy(logits, pseudo, 0.3)
    loss.backward()
    assert pseudo.grad is None


def test_confident_ce_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 10, generator=g)
    pseudo = torch.randn(64, 10, generator=g) * 4
    full, n1 = obj.confident_cross_entropy(logits, pseudo, 0.5, balance=True)
    half, n2 = obj.confident_cross_entropy(logits.bfloat16(), pseudo, 0.5, balance=True)
    assert n1 == n2 and half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=2e-2)


def test_confident_ce_gradcheck():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pseudo = torch.randn(9, 4, generator=g, dtype=torch.float64) * 4
    w = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    for balance in (False, True):
        assert torch.autograd.gradcheck(
            lambda z: obj.confident_cross_entropy(z, pseudo, 0.4, w, balance)[0], (logits,)
        )


# ---------------------------------------------------------------- similarity alignment
def _dense_reference(pt, pm, normalize_rows):
    if normalize_rows:
        pt = pt / pt.norm(dim=1, keepdim=True)
        pm = pm / pm.norm(dim=1, keepdim=True)
    n = pt.shape[0]
    total = 0.0
    st, sm = pt @ pt.T, pm @ pm.T
    for i in range(n):
        for j in range(n):
            total = total + (st[i, j] - sm[i, j]) ** 2
    return total / (n * n)


def test_similarity_alignment_hand_case():
    # N=2, one-hot rows: S_t = I, S_m = all ones -> two off-diagonal squared errors of 1 over N^2 = 4.
    pt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pm = torch.tensor([[1.0], [1.0]])
    for method in ("gram", "dense"):
        assert obj.similarity_alignment(pt, pm, method=method).item() == pytest.approx(0.5)


@pytest.mark.parametrize("n", [1, 2, 37, 513])
@pytest.mark.parametrize("normalize_rows", [True, False])
def test_gram_equals_dense_value_and_gradient(n, normalize_rows):
    g = torch.Generator().manual_seed(n)
    lt = torch.randn(n, 7, generator=g, dtype=torch.float64)
    lm = torch.randn(n, 23, generator=g, dtype=torch.float64)
    grads = {}
    values = {}
    for method in ("gram", "dense"):
        a = lt.clone().requires_grad_()
        b = lm.clone().requires_grad_()
        loss = obj.similarity_alignment(a.softmax(1), b.softmax(1), normalize_rows, method)
        loss.backward()
        values[method] = loss.item()
        grads[method] = (a.grad, b.grad)
    assert values["gram"] == pytest.approx(values["dense"], rel=1e-10, abs=1e-14)
    for x, y in zip(grads["gram"], grads["dense"]):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-14)
    if n <= 37:
        ref = _dense_reference(lt.softmax(1), lm.softmax(1), normalize_rows)
        assert values["gram"] == pytest.approx(float(ref), rel=1e-10, abs=1e-14)


def test_similarity_alignment_gradcheck():
    g = torch.Generator().manual_seed(11)
    lt = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lm = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for normalize_rows in (True, False):
        assert torch.autograd.gradcheck(
            lambda a, b: obj.similarity_alignment(a.softmax(1), b.softmax(1), normalize_rows), (lt, lm)
        )


def test_similarity_alignment_bf16_accumulates_in_fp32():
    g = torch.Generator().manual_seed(2)
    pt = torch.randn(256, 10, generator=g).softmax(1)
    pm = torch.randn(256, 40, generator=g).softmax(1)
    full = obj.similarity_alignment(pt, pm)
    half = obj.similarity_alignment(pt.bfloat16(), pm.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=3e-2)


# ---------------------------------------------------------------- long-tail losses
def test_cb_loss_reference():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(11, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 2, 1, 0])
    n = torch.tensor([10.0, 4.0, 1.5], dtype=torch.float64)
    gamma = 0.9
    cb = [(1 - gamma) / (1 - gamma ** float(v)) for v in n]
    num = sum(cb[int(t)] * F.cross_entropy(logits[i : i + 1], y[i : i + 1]).item() for i, t in enumerate(y))
    den = sum(cb[int(t)] for t in y)
    got = obj.long_tail_cross_entropy(logits, y, n, "cb", gamma=gamma)
    assert got.item() == pytest.approx(num / den, rel=1e-12)


def test_balms_hand_case():
    # equal logits: p_y = pi_y, so the loss is -mean(log pi_y)
    logits = torch.zeros(3, 2, dtype=torch.float64)
    y = torch.tensor([0, 0, 1])
    n = torch.tensor([3.0, 1.0], dtype=torch.float64)
    got = obj.long_tail_cross_entropy(logits, y, n, "balms")
    expected = -(2 * math.log(0.75) + math.log(0.25)) / 3
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_eql_hand_case():
    # w = max(n)/n = [1, 4]; equal logits: p_0 = 1/5, p_1 = 1/5 -> loss log 5 for every sample.
    logits = torch.zeros(2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    n = torch.tensor([4.0, 1.0], dtype=torch.float64)
    got = obj.long_tail_cross_entropy(logits, y, n, "eql")
    assert got.item() == pytest.approx(math.log(5), rel=1e-12)
    # with explicit M the weights are the Eq. 2 weights M / n = [1.5, 6]: p = 1/7.5
    got = obj.long_tail_cross_entropy(logits, y, n, "eql", num_aux=6)
    assert got.item() == pytest.approx(math.log(7.5), rel=1e-12)


def test_long_tail_mask_and_empty_selection():
    logits = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1])
    n = torch.tensor([3.0, 2.0, 1.0])
    mask = torch.tensor([True, False, True, False, False])
    for variant in ("cb", "balms", "eql"):
        full = obj.long_tail_cross_entropy(logits[mask], y[mask], n, variant)
        masked = obj.long_tail_cross_entropy(logits, y, n, variant, mask=mask)
        assert masked.item() == pytest.approx(full.item(), rel=1e-6)
        empty = obj.long_tail_cross_entropy(logits, y, n, variant, mask=torch.zeros(5, dtype=torch.bool))
        assert empty.item() == 0.0 and empty.requires_grad


def test_long_tail_gradcheck():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (8,), generator=g)
    n = torch.tensor([9.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    for variant in ("cb", "balms", "eql"):
        assert torch.autograd.gradcheck(lambda z: obj.long_tail_cross_entropy(z, y, n, variant), (logits,))


def test_effective_counts_inverts_mini_weights():
    counts = _counts_owning([0, 0, 0, 0, 1, 1, 2], 3)
    w = obj.class_weights(counts, 0.5, "mini")
    assert torch.allclose(obj.effective_counts(w, 7), torch.tensor([4.0, 2.0, 1.0]))
