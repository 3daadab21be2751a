"""The Triton kernels of mcscale.kernels against the references in mcscale.objectives.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. That mode is fixed when triton
is first imported (its own helpers such as tl.sum are decorated then), and ``import torchvision``
imports triton, so TRITON_INTERPRET must be set before any of that. It is set here, first thing; when
an earlier test module already imported triton in compiled mode (the usual case in a full run), only
test_kernels_in_fresh_process is collected, and it runs this file in a fresh process. With a GPU the
same tests run the compiled kernels on CUDA tensors and the environment is left alone.
"""

import os

import torch  # importing torch alone does not import triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
from _support import run_file_in_fresh_interpreter_mode  # noqa: E402

import mcscale.kernels as mk  # noqa: E402
from mcscale import objectives as obj  # noqa: E402
from mcscale.cli import load_benchmark  # noqa: E402
from mcscale.kernels import _runtime  # noqa: E402

NEEDS_FRESH_PROCESS = DEVICE == "cpu" and not _runtime.interpreting()


def test_kernels_in_fresh_process():
    if not NEEDS_FRESH_PROCESS:
        pytest.skip("the kernels run in this process")
    run_file_in_fresh_interpreter_mode(__file__)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dev(*tensors):
    out = tuple(t.to(DEVICE) for t in tensors)
    return out if len(out) > 1 else out[0]


# ---------------------------------------------------------------- contingency
@pytest.mark.parametrize("n,k,m", [(1, 3, 7), (37, 10, 40), (256, 3, 7)])
def test_contingency_matches_reference(n, k, m):
    g = _gen(n + k)
    a = torch.randint(0, k, (n,), generator=g)
    b = torch.randint(0, m, (n,), generator=g)
    a[0], b[-1] = k - 1, m - 1  # the last cluster of each head is hit
    a[-1], b[0] = 0, 0
    got = mk.contingency(*_dev(a, b), k, m)
    assert got.dtype == torch.long and got.shape == (k, m)
    assert torch.equal(got.cpu(), obj.contingency(a, b, k, m))


def test_contingency_strided_int32_labels():
    g = _gen(1)
    a = torch.randint(0, 10, (80,), generator=g, dtype=torch.int32)[::2]
    b = torch.randint(0, 40, (80,), generator=g, dtype=torch.int32)[1::2]
    assert torch.equal(mk.contingency(*_dev(a, b), 10, 40).cpu(), obj.contingency(a, b, 10, 40))


def test_contingency_rejects_bad_labels():
    with pytest.raises(ValueError):
        mk.contingency(*_dev(torch.tensor([0, 3]), torch.tensor([0, 0])), 3, 2)
    with pytest.raises(ValueError):
        mk.contingency(*_dev(torch.tensor([0, -1]), torch.tensor([0, 0])), 3, 2)
    with pytest.raises(ValueError):
        mk.contingency(*_dev(torch.tensor([0, 1]), torch.tensor([0])), 3, 2)


# ---------------------------------------------------------------- class weights
def _weights_both(counts, delta, mode):
    got = mk.class_weights(_dev(counts), delta, mode).cpu()
    ref = obj.class_weights(counts, delta, mode)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref), (mode, delta, got, ref)
    return got


def test_class_weights_hand_cases():
    four_two_one = torch.tensor([[5, 5, 5, 0, 0, 2], [0, 0, 0, 4, 4, 0], [0, 0, 0, 0, 0, 2]])
    assert torch.allclose(_weights_both(four_two_one, 0.3, "mini"), torch.tensor([1.5, 3.0, 6.0]))
    tie = torch.tensor([[3, 0], [3, 0]])  # shares 0.5 / 0.5 in column 0; column 1 empty
    assert torch.equal(_weights_both(tie, 0.5, "mini"), torch.tensor([4.0, 4.0]))  # strict ">"
    assert torch.equal(_weights_both(tie, 0.49, "mini"), torch.tensor([2.0, 2.0]))
    rows = torch.tensor([[3, 3, 4, 0], [0, 0, 0, 9], [0, 0, 0, 0]])
    assert torch.equal(_weights_both(rows, 0.25, "maxi"), torch.tensor([3.0, 1.0, 0.5]))
    assert torch.equal(_weights_both(rows, 0.3, "maxi"), torch.tensor([1.0, 1.0, 0.5]))
    # shares exactly at delta in float64 (3 / 10 == 0.3) do not count
    edge = torch.tensor([[3, 7], [7, 3]])
    _weights_both(edge, 0.3, "mini")
    _weights_both(edge, 0.3, "maxi")


@pytest.mark.parametrize("k,m", [(3, 7), (10, 40), (300, 7), (7, 300)])
@pytest.mark.parametrize("mode", ["mini", "maxi"])
def test_class_weights_match_reference(k, m, mode):
    g = _gen(k * m)
    counts = torch.randint(0, 4, (k, m), generator=g) * (torch.rand(k, m, generator=g) < 0.4)
    counts[:, 0] = 0  # an empty column
    counts[0, :] = 0  # an empty row
    for delta in (0.0, 0.25, 0.3, 0.5, 0.7, -0.1):
        _weights_both(counts, delta, mode)
    _weights_both(counts.to(torch.int32), 0.3, mode)
    _weights_both(counts.double(), 0.3, mode)
    got = mk.class_weights(_dev(counts.T.contiguous()).T, 0.3, mode).cpu()  # strided view
    assert torch.equal(got, obj.class_weights(counts, 0.3, mode))


def test_class_weights_from_kernel_contingency():
    g = _gen(3)
    a = torch.randint(0, 10, (256,), generator=g)
    b = torch.randint(0, 40, (256,), generator=g)
    counts = mk.contingency(*_dev(a, b), 10, 40)
    for mode in ("mini", "maxi"):
        assert torch.equal(mk.class_weights(counts, 0.3, mode).cpu(),
                           obj.class_weights(obj.contingency(a, b, 10, 40), 0.3, mode))
    with pytest.raises(ValueError):
        mk.class_weights(counts, 0.3, mode="midi")


# ---------------------------------------------------------------- confident cross-entropy
def _ce_inputs(n, k, seed, confident_edges=True):
    g = _gen(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    pseudo = torch.randn(n, k, generator=g) * 3
    if confident_edges and n >= 2:
        pseudo[0] = 0.0
        pseudo[0, 0] = 20.0  # confident on the first class
        pseudo[-1] = 0.0
        pseudo[-1, k - 1] = 20.0  # confident on the last class
    weight = torch.rand(k, generator=g) * 4 + 0.5
    return logits, pseudo, weight


def _ce_both(logits, pseudo, tau, weight, balance, normalize, dtype):
    out = {}
    for name, fn, dev in (("ref", obj.confident_cross_entropy, "cpu"),
                          ("kernel", mk.confident_cross_entropy, DEVICE)):
        z = logits.to(dtype).to(dev).requires_grad_()
        w = None if weight is None else weight.to(dev)
        loss, num = fn(z, pseudo.to(dev), tau, w, balance, normalize)
        loss.backward()
        out[name] = (loss.detach().cpu(), num, z.grad.cpu())
    return out["ref"], out["kernel"]


CE_CASES = [  # (n, k, dtype, value rtol, grad atol relative to the largest gradient)
    (37, 10, torch.float32, 1e-5, 1e-5),
    (256, 3, torch.float32, 1e-5, 1e-5),
    (37, 10, torch.float64, 1e-12, 1e-12),
    (37, 10, torch.bfloat16, 1e-4, 1e-2),
    (37, 1500, torch.float32, 1e-5, 1e-5),  # one row per program; finish loops over class blocks
]


@pytest.mark.parametrize("n,k,dtype,rtol,gtol", CE_CASES)
def test_confident_ce_matches_reference(n, k, dtype, rtol, gtol):
    logits, pseudo, weight = _ce_inputs(n, k, seed=n + k)
    tau = 0.5 if k < 100 else 0.002
    for balance in (False, True):
        for normalize in ("weight_sum", "count"):
            for w in ((weight, None) if not balance and normalize == "weight_sum" else (weight,)):
                ref, got = _ce_both(logits, pseudo, tau, w, balance, normalize, dtype)
                assert got[1] == ref[1] > 2
                assert got[0].dtype == ref[0].dtype
                assert got[0].item() == pytest.approx(ref[0].item(), rel=rtol)
                scale = ref[2].abs().max().item()
                assert torch.allclose(got[2].double(), ref[2].double(), rtol=0, atol=gtol * scale)


def test_confident_ce_single_row_and_first_last_labels():
    logits = torch.randn(2, 3, generator=_gen(0), dtype=torch.float64)
    pseudo = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    ref, got = _ce_both(logits, pseudo, 0.9, None, True, "weight_sum", torch.float32)
    assert got[1] == ref[1] == 2
    assert got[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert torch.allclose(got[2], ref[2], atol=1e-6)
    ref, got = _ce_both(logits[:1], pseudo[:1], 0.9, None, False, "count", torch.float32)
    assert got[1] == ref[1] == 1 and got[0].item() == pytest.approx(ref[0].item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confident_ce_empty_set_is_connected_zero(dtype):
    logits = torch.randn(5, 3, generator=_gen(1))
    ref, got = _ce_both(logits, torch.zeros(5, 3), 0.99, None, True, "weight_sum", dtype)
    assert got[1] == ref[1] == 0
    assert got[0].item() == 0.0 and got[0].dtype == ref[0].dtype
    assert torch.all(got[2] == 0)


def test_confident_ce_threshold_is_strict_and_pseudo_gets_no_grad():
    _, num = mk.confident_cross_entropy(_dev(torch.zeros(1, 2)), _dev(torch.zeros(1, 2)), 0.5)
    assert num == 0
    z = _dev(torch.randn(6, 3, generator=_gen(2))).requires_grad_()
    pseudo = _dev(torch.randn(6, 3, generator=_gen(3)) * 5).requires_grad_()
    loss, _ = mk.confident_cross_entropy(z, pseudo, 0.3)
    loss.backward()
    assert pseudo.grad is None and z.grad is not None
    with pytest.raises(ValueError):
        mk.confident_cross_entropy(z, pseudo, 0.3, normalize="mean")


# ---------------------------------------------------------------- similarity alignment
SIM_CASES = [  # (n, k, m, dtype, normalize_rows, value rtol, grad atol relative to the largest)
    (37, 10, 40, torch.float64, True, 1e-10, 1e-10),
    (1, 3, 7, torch.float32, True, None, None),  # L = 0 up to rounding: absolute checks
    (37, 10, 40, torch.float32, False, 1e-5, 1e-5),
    (256, 10, 40, torch.float32, True, 1e-4, 1e-5),
    (37, 3, 7, torch.bfloat16, True, 2e-2, 2e-2),
    (256, 10, 40, torch.bfloat16, True, 2e-2, 2e-2),
    (37, 100, 40, torch.float64, True, 1e-10, 1e-10),  # K + M > 128: scratch + normalisation kernel
    (37, 100, 40, torch.float32, False, 1e-5, 1e-5),
]


def _sim_both(lt, lm, dtype, normalize_rows):
    out = {}
    for name, fn, dev in (("ref", obj.similarity_alignment, "cpu"),
                          ("kernel", mk.similarity_alignment, DEVICE)):
        a = lt.to(dev).requires_grad_()
        b = lm.to(dev).requires_grad_()
        loss = fn(a.softmax(1).to(dtype), b.softmax(1).to(dtype), normalize_rows)
        loss.backward()
        out[name] = (loss.detach().cpu(), a.grad.cpu(), b.grad.cpu())
    return out["ref"], out["kernel"]


@pytest.mark.parametrize("n,k,m,dtype,normalize_rows,rtol,gtol", SIM_CASES)
def test_similarity_alignment_matches_reference(n, k, m, dtype, normalize_rows, rtol, gtol):
    g = _gen(n + m)
    lt = torch.randn(n, k, generator=g, dtype=torch.float64)
    lm = torch.randn(n, m, generator=g, dtype=torch.float64)
    ref, got = _sim_both(lt, lm, dtype, normalize_rows)
    assert got[0].dtype == ref[0].dtype
    if rtol is None:
        assert abs(got[0].item()) < 1e-6
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(got[1:], ref[1:]))
        return
    assert got[0].item() == pytest.approx(ref[0].item(), rel=rtol)
    for x, y in zip(got[1:], ref[1:]):
        assert torch.allclose(x, y, rtol=0, atol=gtol * y.abs().max().item())


def test_similarity_alignment_hand_case_and_strided_inputs():
    pt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pm = torch.tensor([[1.0], [1.0]])
    assert mk.similarity_alignment(*_dev(pt, pm)).item() == pytest.approx(0.5)
    g = _gen(4)
    a = torch.randn(7, 20, generator=g).softmax(0).T  # 20 x 7, column-major
    b = torch.randn(20, 9, generator=g).softmax(1)[:, :5]  # rows with stride 9
    for normalize_rows in (True, False):
        got = mk.similarity_alignment(*_dev(a, b), normalize_rows).item()
        assert got == pytest.approx(obj.similarity_alignment(a, b, normalize_rows).item(), rel=1e-5)


# ---------------------------------------------------------------- dispatch
def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(_runtime, "interpreting", lambda: False)
    x = torch.rand(4, 3)
    calls = [
        lambda: mk.contingency(torch.tensor([0]), torch.tensor([0]), 1, 1),
        lambda: mk.class_weights(torch.ones(2, 2, dtype=torch.long), 0.3),
        lambda: mk.confident_cross_entropy(x, x, 0.5),
        lambda: mk.similarity_alignment(x, x),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            call()


# ---------------------------------------------------------------- benchmark objectives
def test_bench_objectives_agree():
    bench = load_benchmark("kernels")

    results = []
    for fn in (bench.eager_objective, bench.triton_objective, bench.fused_objective):
        inputs = bench.make_inputs(64, 10, 40, DEVICE)
        loss = fn(*inputs)
        loss.backward()
        results.append((loss.item(), inputs[0].grad.cpu(), inputs[1].grad.cpu()))
    (ref, *ref_grads), *others = results
    for got, *got_grads in others:
        assert got == pytest.approx(ref, rel=1e-5)
        for x, y in zip(got_grads, ref_grads):
            assert torch.allclose(x, y, rtol=0, atol=1e-5 * y.abs().max().item())


def test_bench_run_writes_csv(tmp_path, monkeypatch, capsys):
    import csv
    import time

    bench = load_benchmark("kernels")

    def slow():  # eager plus 30 ms a step: a variant whose speed-up must come out below 1
        def fn(*inputs):
            time.sleep(0.03)
            return bench.eager_objective(*inputs)
        return fn

    def broken():
        def fn(*inputs):
            raise RuntimeError("no kernel for this size\nsecond line")
        return fn

    variants = [("eager", lambda: bench.eager_objective), ("slow", slow), ("broken", broken)]
    monkeypatch.setattr(bench, "_variants", lambda cuda: variants)
    out = tmp_path / "bench.csv"
    sizes = [(32, 3, 7), (48, 5, 11)]
    rows = bench.run(str(out), device="cpu", repeats=3, sizes=sizes)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.FIELDS
        written = list(reader)
    assert written == [{key: str(value) for key, value in row.items()} for row in rows]
    assert [(int(r["n"]), int(r["k"]), int(r["m"]), r["variant"]) for r in written] == [
        (*size, name) for size in sizes for name in ("eager", "slow", "broken")]
    for r in written:
        assert r["device"].startswith("cpu (") and r["torch"] == torch.__version__ and r["repeats"] == "3"
        assert r["launches"] == "" and r["peak_mem_mb"] == ""  # not counted for PyTorch variants, no CUDA
    for size in sizes:
        eager, slow_row, failed = [r for r in written if (int(r["n"]), int(r["k"]), int(r["m"])) == size]
        assert eager["error"] == slow_row["error"] == ""
        assert 0 < float(eager["median_ms"]) and 0 < float(eager["first_ms"])
        assert float(slow_row["median_ms"]) >= 30.0
        assert float(eager["speedup_vs_eager"]) == 1.0
        ratio = float(eager["median_ms"]) / float(slow_row["median_ms"])
        assert float(slow_row["speedup_vs_eager"]) == pytest.approx(ratio, abs=0.011)  # no timing claim: load varies
        # a failing variant is a row with its error (first line) and no numbers
        assert failed["error"] == "RuntimeError: no kernel for this size"
        assert failed["median_ms"] == failed["loss"] == failed["speedup_vs_eager"] == ""
        # the logged loss is the objective of the benchmark's inputs, composed from mcscale.objectives
        lt1, lm1, lt2, lm2 = bench.make_inputs(*size, "cpu")
        k, m = size[1], size[2]
        w = obj.class_weights(obj.contingency(lt1.argmax(1), lm1.argmax(1), k, m), bench.DELTA, "mini")
        l_r, n_t = obj.confident_cross_entropy(lt1, lt2, bench.TAU, w)
        l_m, n_m = obj.confident_cross_entropy(lm1, lm2, bench.TAU, balance=True)
        l_s = obj.similarity_alignment(lt1.softmax(1), lm1.softmax(1), True)
        assert n_t > 0 and n_m > 0
        expected = (l_r + bench.ALPHA * l_m + bench.BETA * l_s).item()
        assert float(eager["loss"]) == pytest.approx(expected, rel=1e-5)
        assert slow_row["loss"] == eager["loss"]
    assert "median_ms" in capsys.readouterr().out


def test_bench_counts_launches_of_the_triton_variants(tmp_path, monkeypatch):
    bench = load_benchmark("kernels")

    variants = [("eager", lambda: bench.eager_objective), ("fused", lambda: bench.fused_objective),
                ("ops", lambda: bench.triton_objective)]
    monkeypatch.setattr(bench, "_variants", lambda cuda: variants)
    rows = bench.run(str(tmp_path / "bench.csv"), device=DEVICE, repeats=1, sizes=[(32, 3, 7)])
    assert [(r["variant"], r["launches"], r["error"]) for r in rows] == [("eager", "", ""), ("fused", 3, ""),
                                                                          ("ops", 12, "")]
    assert rows[1]["loss"] == rows[0]["loss"]


if NEEDS_FRESH_PROCESS:  # only the runner above is collected here; the rest runs in its subprocess
    for _name in [name for name in globals() if name.startswith("test_")]:
        if _name != "test_kernels_in_fresh_process":
            del globals()[_name]
