"""mcscale.objectives.global_batch: 2 gloo ranks on CPU reproduce the single-process statistics of the global batch.

One process group is spawned for the whole module (spawning costs seconds): both ranks run every case
of CASES on their slice of the same deterministic global inputs and save the results; the parent
computes the single-process reference on the concatenated batch and compares values, gradients
(what DDP applies: the sum over ranks of the local gradients divided by W) and bytes communicated.
"""

from __future__ import annotations

import dataclasses
import math
import traceback
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _support import run_on_gloo_ranks

from mcscale import objectives as obj
from mcscale import parallel as P
from mcscale.objectives import global_batch as D
from mcscale.objectives.p2ot import p2ot_plan

WORLD = 2
K, M, FEAT = 3, 7, 5
EVEN, UNEVEN = (19, 19), (17, 21)
I64, F32, F64 = 8, 4, 8  # bytes per element


@dataclass
class Case:
    make: Callable[[], tuple[dict, dict]]  # (row tensors, split over ranks; shared tensors)
    run: Callable[[dict, dict, bool], dict]  # (rows, shared, distributed) -> {"loss", "same", "rows"}
    split: tuple = EVEN
    grad: tuple = ()  # names of the inputs that get requires_grad
    nbytes: int | None = None  # expected bytes on every rank
    dtype: torch.dtype = torch.float64
    # (rows, shared) -> the same outputs as ``run``, by plain formulas on the whole batch (loops, dense
    # matrices, a textbook Sinkhorn): the independent reference of the world-size-1 test
    plain: Callable[[dict, dict], dict] | None = None


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float64, scale=1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def _tol(dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- plain references
def _log_softmax_plain(z: torch.Tensor) -> torch.Tensor:
    """log p_ij = z_ij - c_i - log sum_j exp(z_ij - c_i), c_i the row maximum."""
    shifted = z - z.max(1, keepdim=True).values.detach()
    return shifted - torch.log(torch.exp(shifted).sum(1, keepdim=True))


def plain_confident_ce(logits, pseudo, tau, class_weight=None, balance=False, normalize="weight_sum"):
    """Confident-set cross-entropy written out sample by sample (METHOD section 4)."""
    p = torch.exp(pseudo.detach().double())
    p = p / p.sum(1, keepdim=True)
    conf, labels = p.max(1)
    chosen = [i for i in range(len(labels)) if conf[i] > tau]
    if not chosen:
        return logits.sum() * 0.0, 0
    per_class = {}
    for i in chosen:
        per_class[int(labels[i])] = per_class.get(int(labels[i]), 0) + 1
    log_p = _log_softmax_plain(logits)
    total, weight_sum = 0.0, 0.0
    for i in chosen:
        y = int(labels[i])
        w = 1.0 if class_weight is None else float(class_weight[y])
        if balance:
            w *= len(chosen) / per_class[y]
        total = total - w * log_p[i, y]
        weight_sum += w
    return total / (weight_sum if normalize == "weight_sum" else len(chosen)), len(chosen)


def plain_similarity(probs_t, probs_m, normalize_rows):
    """(1/N^2) sum_ij (S_t - S_m)^2 with the N x N similarity matrices built explicitly."""
    a, b = probs_t, probs_m
    if normalize_rows:
        a = a / torch.sqrt((a * a).sum(1, keepdim=True))
        b = b / torch.sqrt((b * b).sum(1, keepdim=True))
    n = a.shape[0]
    return ((a @ a.T - b @ b.T) ** 2).sum() / (n * n)


def plain_sinkhorn(logits, rho, eps, lam, tol=1e-13, max_iter=100000):
    """Textbook log-domain scaling for the P2OT plan (METHOD section 7): a virtual zero-cost column of
    mass 1 - rho, hard rows 1/N, KL-relaxed real columns rho/K (exponent lam / (lam + eps))."""
    z = logits.detach().double()
    n, k = z.shape
    log_kernel = torch.cat([_log_softmax_plain(z) / eps, torch.zeros(n, 1, dtype=torch.float64)], 1)
    log_beta = torch.tensor([math.log(rho / k)] * k + [math.log(1.0 - rho)], dtype=torch.float64)
    f = torch.tensor([lam / (lam + eps)] * k + [1.0], dtype=torch.float64)
    log_v = torch.zeros(k + 1, dtype=torch.float64)
    for _ in range(max_iter):
        log_u = -math.log(n) - torch.logsumexp(log_kernel + log_v, 1)
        new = f * (log_beta - torch.logsumexp(log_kernel + log_u[:, None], 0))
        done = (new - log_v).abs().max() < tol
        log_v = new
        if done:
            break
    else:
        raise AssertionError("the plain Sinkhorn did not converge")
    log_u = -math.log(n) - torch.logsumexp(log_kernel + log_v, 1)
    return n * torch.exp(log_u[:, None] + log_kernel[:, :k] + log_v[:k]), log_v


# ---------------------------------------------------------------- case builders
def contingency_case(split):
    def make():
        g, n = _gen(1), sum(split)
        return {"a": torch.randint(0, K, (n,), generator=g), "b": torch.randint(0, M, (n,), generator=g)}, {}

    def run(rows, shared, distributed):
        fn = D.global_contingency if distributed else obj.contingency
        return {"same": {"counts": fn(rows["a"], rows["b"], K, M)}}

    def plain(rows, shared):
        counts = torch.zeros(K, M, dtype=torch.int64)
        for a, b in zip(rows["a"].tolist(), rows["b"].tolist()):
            counts[a, b] += 1
        return {"same": {"counts": counts}}

    return Case(make, run, split, nbytes=K * M * I64, plain=plain)


def _pseudo_logits(g, n, classes, split, empty, dtype):
    pseudo = torch.randn(n, classes, generator=g, dtype=dtype) * 3.0
    if empty in ("rank0", "both"):  # uniform rows: max p = 1 / classes, below tau
        pseudo[: split[0]] = 0.0
    if empty == "both":
        pseudo[:] = 0.0
    return pseudo


def ce_case(split, balance, normalize, weighted, empty="none", classes=K, dtype=torch.float64, tau=0.8):
    def make():
        g, n = _gen(2), sum(split)
        rows = {
            "x": torch.randn(n, FEAT, generator=g, dtype=dtype),
            "pseudo": _pseudo_logits(g, n, classes, split, empty, dtype),
        }
        shared = {"w": _randn(g, FEAT, classes, dtype=dtype), "cw": torch.rand(classes, generator=g) + 0.5}
        return rows, shared

    def run(rows, shared, distributed):
        fn = D.global_confident_cross_entropy if distributed else obj.confident_cross_entropy
        cw = shared["cw"] if weighted else None
        loss, selected = fn(rows["x"] @ shared["w"], rows["pseudo"], tau, cw, balance, normalize)
        return {"loss": loss, "same": {"selected": selected}}

    def plain(rows, shared):
        cw = shared["cw"] if weighted else None
        loss, selected = plain_confident_ce(rows["x"] @ shared["w"], rows["pseudo"], tau, cw, balance, normalize)
        return {"loss": loss, "same": {"selected": selected}}

    return Case(make, run, split, ("x", "w"), 2 * classes * F64, dtype, plain)


def similarity_case(split, normalize_rows, method, k=K, m=M, dtype=torch.float64, nbytes=None):
    def make():
        g, n = _gen(3), sum(split)
        shared = {"wt": _randn(g, FEAT, k, dtype=dtype), "wm": _randn(g, FEAT, m, dtype=dtype)}
        return {"x": _randn(g, n, FEAT, dtype=dtype, scale=2.0)}, shared

    def run(rows, shared, distributed):
        pt = torch.softmax(rows["x"] @ shared["wt"], 1)
        pm = torch.softmax(rows["x"] @ shared["wm"], 1)
        if distributed:
            return {"loss": D.global_similarity_alignment(pt, pm, normalize_rows, method)}
        return {"loss": obj.similarity_alignment(pt, pm, normalize_rows)}

    def plain(rows, shared):
        pt = torch.exp(rows["x"] @ shared["wt"])
        pm = torch.exp(rows["x"] @ shared["wm"])
        return {"loss": plain_similarity(pt / pt.sum(1, keepdim=True), pm / pm.sum(1, keepdim=True), normalize_rows)}

    return Case(make, run, split, ("x", "wt", "wm"), nbytes, dtype, plain)


def gram_bytes(k, m, itemsize=F64):
    return I64 + (k * k + m * m + k * m) * itemsize


def gather_bytes(split, k, m, itemsize=F64):
    return I64 + max(split) * (k + m) * itemsize


def long_tail_case(split, variant, masking, num_aux=None, dtype=torch.float64):
    def make():
        g, n = _gen(4), sum(split)
        mask = torch.rand(n, generator=g) > 0.3
        if masking in ("rank0", "both"):
            mask[: split[0]] = False
        if masking == "both":
            mask[:] = False
        rows = {"x": _randn(g, n, FEAT, dtype=dtype), "y": torch.randint(0, K, (n,), generator=g), "mask": mask}
        shared = {"w": torch.randn(FEAT, K, generator=g, dtype=dtype), "counts": torch.tensor([5.0, 2.0, 0.5])}
        return rows, shared

    def run(rows, shared, distributed):
        fn = D.global_long_tail_cross_entropy if distributed else obj.long_tail_cross_entropy
        loss = fn(rows["x"] @ shared["w"], rows["y"], shared["counts"], variant, 0.9, rows["mask"], num_aux)
        return {"loss": loss}

    def plain(rows, shared):
        """Only the class-balanced variant (Cui et al.): weight (1 - g) / (1 - g^n_y), weighted mean."""
        assert variant == "cb"
        log_p = _log_softmax_plain(rows["x"] @ shared["w"])
        total, weight_sum = 0.0, 0.0
        for i in torch.nonzero(rows["mask"]).flatten().tolist():
            y = int(rows["y"][i])
            w = (1 - 0.9) / (1 - 0.9 ** float(shared["counts"][y]))
            total, weight_sum = total - w * log_p[i, y], weight_sum + w
        return {"loss": total / weight_sum}

    itemsize = F64 if dtype == torch.float64 else F32
    return Case(make, run, split, ("x", "w"), 2 * itemsize, dtype, plain if variant == "cb" else None)


def reference_soft_ce(logits, target, weights=None):
    """methods.P2OT.soft_ce, copied so that this file tests against a fixed reference."""
    per_sample = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)
    if weights is None:
        return per_sample.mean()
    w = weights[target.argmax(1)]
    return (w * per_sample).sum() / w.sum()


def soft_ce_case(split, weighted):
    def make():
        g, n = _gen(5), sum(split)
        target = torch.softmax(_randn(g, n, K, dtype=torch.float32, scale=2.0), 1) * 0.8  # rows sum to 0.8
        rows = {"x": _randn(g, n, FEAT, dtype=torch.float32), "target": target}
        return rows, {"w": torch.randn(FEAT, K, generator=g), "cw": torch.rand(K, generator=g) + 0.5}

    def run(rows, shared, distributed):
        cw = shared["cw"] if weighted else None
        fn = D.global_soft_cross_entropy if distributed else reference_soft_ce
        return {"loss": fn(rows["x"] @ shared["w"], rows["target"], cw)}

    def plain(rows, shared):
        log_p = _log_softmax_plain(rows["x"] @ shared["w"])
        target = rows["target"]
        total, weight_sum = 0.0, 0.0
        for i in range(target.shape[0]):
            w = float(shared["cw"][int(target[i].argmax())]) if weighted else 1.0
            total, weight_sum = total - w * (target[i] * log_p[i]).sum(), weight_sum + w
        return {"loss": total / weight_sum}

    return Case(make, run, split, ("x", "w"), 2 * F32, torch.float32, plain)


def p2ot_case(split, with_buffer):
    def make():
        g, n = _gen(6), sum(split)
        return {"z": torch.randn(n, K, generator=g) * 3}, {"buffer": torch.randn(2 * n, K, generator=g) * 3}

    def run(rows, shared, distributed):
        buffer = shared["buffer"] if with_buffer else None
        options = dict(eps=0.1, lam=1.0, max_iter=500, tol=1e-8)
        if distributed:
            plan, state = D.global_p2ot_plan(rows["z"], 0.3, buffer, **options)
            current = state["global_logits"]
        else:
            pool = rows["z"] if buffer is None else torch.cat([buffer, rows["z"]])
            plan, state = p2ot_plan(pool, 0.3, **options)
            plan, current = plan[-rows["z"].shape[0]:], rows["z"]
        same = {"log_v": state["log_v"], "iterations": state["iterations"], "global_logits": current}
        return {"rows": {"plan": plan}, "same": same}

    def plain(rows, shared):  # the iteration count is the solver's own business: not compared
        pool = rows["z"] if not with_buffer else torch.cat([shared["buffer"], rows["z"]])
        plan, log_v = plain_sinkhorn(pool, 0.3, eps=0.1, lam=1.0)
        plan = plan[-rows["z"].shape[0]:].float()
        return {"rows": {"plan": plan}, "same": {"log_v": log_v, "global_logits": rows["z"]}}

    return Case(make, run, split, nbytes=I64 + max(split) * K * F32, dtype=torch.float32, plain=plain)


def collectives_case(split):
    """all_gather_cat / all_reduce_sum / all_gather_with_grad against plain tensor operations."""

    def make():
        g, n = _gen(7), sum(split)
        return {"x": _randn(g, n, 4)}, {"c": _randn(g, 4, 4)}

    def run(rows, shared, distributed):
        x = rows["x"]
        if distributed:
            gathered, total, full = P.all_gather_cat(x), P.all_reduce_sum(x.sum(0)), P.all_gather_with_grad(x)
        else:
            gathered, total, full = x.detach(), x.sum(0).detach(), x
        loss = ((full @ shared["c"]) ** 2).sum() / float(sum(split))
        if distributed:  # the same loss on every rank: same value, gradient times W for DDP averaging
            loss = loss + (P.world_size() - 1) * (loss - loss.detach())
        return {"loss": loss, "same": {"gathered": gathered, "total": total}}

    def plain(rows, shared):
        x, c = rows["x"], shared["c"]
        total = torch.zeros(4, dtype=x.dtype)
        for row in x.detach():
            total += row
        return {"loss": ((x @ c) ** 2).sum() / x.shape[0], "same": {"gathered": x.detach().clone(), "total": total}}

    nbytes = 2 * (I64 + max(split) * 4 * F64) + 4 * F64  # two gathers (sizes + rows) and one reduce
    return Case(make, run, split, ("x",), nbytes, plain=plain)


def head_guided_case(split, dtype):
    """L_r + alpha L_m + beta L_s as HeadGuided.batch_loss composes it, weights from the global counts."""

    def make():
        g, n = _gen(8), sum(split)
        rows = {"x1": _randn(g, n, FEAT, dtype=dtype, scale=2.0), "x2": _randn(g, n, FEAT, dtype=dtype, scale=2.0)}
        shared = {"wt": _randn(g, FEAT, K, dtype=dtype, scale=2.0), "wm": _randn(g, FEAT, M, dtype=dtype, scale=2.0)}
        return rows, shared

    def run(rows, shared, distributed):
        t1, m1 = rows["x1"] @ shared["wt"], rows["x1"] @ shared["wm"]
        t2, m2 = rows["x2"] @ shared["wt"], rows["x2"] @ shared["wm"]
        counts_fn = D.global_contingency if distributed else obj.contingency
        ce = D.global_confident_cross_entropy if distributed else obj.confident_cross_entropy
        sim = D.global_similarity_alignment if distributed else obj.similarity_alignment
        counts = counts_fn(t1.detach().argmax(1), m1.detach().argmax(1), K, M)
        weights = obj.class_weights(counts, 0.1, "mini")
        l_r, n_t = ce(t1, t2.detach(), 0.9, weights)
        l_m, n_m = ce(m1, m2.detach(), 0.6, balance=True)
        l_s = sim(torch.softmax(t1, 1), torch.softmax(m1, 1), True)
        return {"loss": l_r + 0.7 * l_m + 2.0 * l_s, "same": {"weights": weights, "n": (n_t, n_m)}}

    def plain(rows, shared):
        t1, m1 = rows["x1"] @ shared["wt"], rows["x1"] @ shared["wm"]
        t2, m2 = rows["x2"] @ shared["wt"], rows["x2"] @ shared["wm"]
        counts = torch.zeros(K, M)
        for a, b in zip(t1.argmax(1).tolist(), m1.argmax(1).tolist()):
            counts[a, b] += 1
        # mini weights (Eq. 2): M / (number of mini-clusters whose share of cluster k is above delta)
        owned = [sum(1 for j in range(M) if counts[:, j].sum() > 0 and counts[k, j] / counts[:, j].sum() > 0.1)
                 for k in range(K)]
        weights = torch.tensor([M / max(c, 0.5) for c in owned])
        l_r, n_t = plain_confident_ce(t1, t2, 0.9, weights)
        l_m, n_m = plain_confident_ce(m1, m2, 0.6, balance=True)
        pt, pm = torch.exp(t1), torch.exp(m1)
        l_s = plain_similarity(pt / pt.sum(1, keepdim=True), pm / pm.sum(1, keepdim=True), True)
        return {"loss": l_r + 0.7 * l_m + 2.0 * l_s, "same": {"weights": weights, "n": (n_t, n_m)}}

    itemsize = F64 if dtype == torch.float64 else F32
    nbytes = K * M * I64 + 2 * K * F64 + 2 * M * F64 + gram_bytes(K, M, itemsize)
    return Case(make, run, split, ("x1", "wt", "wm"), nbytes, dtype, plain)


def _cases() -> dict[str, Case]:
    cases = {}
    for tag, split in (("even", EVEN), ("uneven", UNEVEN)):
        cases[f"contingency-{tag}"] = contingency_case(split)
        for balance in (False, True):
            for normalize in obj.NORMALIZATIONS:
                for weighted in (False, True):
                    name = f"ce-{tag}-bal{int(balance)}-{normalize}-w{int(weighted)}"
                    cases[name] = ce_case(split, balance, normalize, weighted)
        for method in ("gram", "gather"):
            for rows_norm in (True, False):
                nbytes = gram_bytes(K, M) if method == "gram" else gather_bytes(split, K, M)
                name = f"ls-{tag}-{method}-norm{int(rows_norm)}"
                cases[name] = similarity_case(split, rows_norm, method, nbytes=nbytes)
        for variant in obj.LONG_TAIL_VARIANTS:
            cases[f"lt-{tag}-{variant}"] = long_tail_case(split, variant, "random", num_aux=M)
        cases[f"soft-ce-{tag}"] = soft_ce_case(split, False)
        cases[f"soft-ce-{tag}-weighted"] = soft_ce_case(split, True)
        cases[f"p2ot-{tag}"] = p2ot_case(split, False)
        cases[f"p2ot-{tag}-buffer"] = p2ot_case(split, True)
        cases[f"collectives-{tag}"] = collectives_case(split)
        cases[f"head-guided-{tag}"] = head_guided_case(split, torch.float64)
    for balance in (False, True):  # empty confident sets: on rank 0 only, on both ranks
        for normalize in obj.NORMALIZATIONS:
            for empty in ("rank0", "both"):
                name = f"ce-empty-{empty}-bal{int(balance)}-{normalize}"
                cases[name] = ce_case(UNEVEN, balance, normalize, True, empty)
    cases["ce-aux-head-float32"] = ce_case(UNEVEN, True, "weight_sum", False, classes=M, dtype=torch.float32, tau=0.6)
    for masking in ("rank0", "both"):
        cases[f"lt-empty-{masking}-cb"] = long_tail_case(UNEVEN, "cb", masking)
        cases[f"lt-empty-{masking}-eql"] = long_tail_case(UNEVEN, "eql", masking)
    cases["lt-float32-balms"] = long_tail_case(UNEVEN, "balms", "random", dtype=torch.float32)
    cases["ls-auto-picks-gram"] = similarity_case(UNEVEN, True, "auto", nbytes=gram_bytes(K, M))
    cases["ls-auto-picks-gather"] = similarity_case(UNEVEN, True, "auto", 10, 50, nbytes=gather_bytes(UNEVEN, 10, 50))
    cases["ls-float32-gram"] = similarity_case(UNEVEN, True, "gram", dtype=torch.float32, nbytes=gram_bytes(K, M, F32))
    cases["ls-rank0-holds-no-rows"] = similarity_case((0, 38), True, "gram", nbytes=gram_bytes(K, M))
    cases["ls-gather-rank0-holds-no-rows"] = similarity_case((0, 38), True, "gather", nbytes=gather_bytes((0, 38), K, M))
    cases["collectives-rank0-holds-no-rows"] = collectives_case((0, 6))
    cases["p2ot-rank1-holds-no-rows"] = p2ot_case((9, 0), True)
    cases["head-guided-float32"] = head_guided_case(UNEVEN, torch.float32)
    return cases


CASES = _cases()


# ---------------------------------------------------------------- running a case
def execute(case: Case, start: int, stop: int, distributed: bool) -> dict:
    """Run ``case`` on rows [start, stop) of its global inputs; loss, outputs, gradients and bytes."""
    rows, shared = case.make()
    rows = {name: t[start:stop] for name, t in rows.items()}
    leaves = {name: t.clone().requires_grad_() for name, t in {**rows, **shared}.items() if name in case.grad}
    rows = {name: leaves.get(name, t) for name, t in rows.items()}
    shared = {name: leaves.get(name, t) for name, t in shared.items()}
    P.COMM.reset()
    out = case.run(rows, shared, distributed)
    nbytes = P.COMM.take()
    loss = out.get("loss")
    if loss is not None:
        loss.backward()
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    return {"loss": None if loss is None else loss.detach(), "same": out.get("same", {}),
            "rows": out.get("rows", {}), "grads": grads, "bytes": nbytes}


def _run_cases(rank: int) -> dict:
    results = {}
    for name, case in CASES.items():
        start = sum(case.split[:rank])
        try:
            results[name] = execute(case, start, start + case.split[rank], distributed=True)
        except Exception:  # reported by the parent; the other rank may then time out in a collective
            results[name] = {"error": traceback.format_exc()}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the 2-rank gloo group once; every rank's results, per case."""
    return run_on_gloo_ranks(_run_cases, tmp_path_factory.mktemp("distributed"), WORLD)


def assert_close(actual, expected, dtype, what):
    if isinstance(expected, torch.Tensor) and not expected.dtype.is_floating_point:
        assert torch.equal(actual, expected), what
    elif isinstance(expected, (tuple, list)):
        assert list(actual) == list(expected), what
    elif isinstance(expected, int):
        assert actual == expected, what
    else:
        torch.testing.assert_close(actual, expected, **_tol(dtype), msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- 2 ranks against one process
@pytest.mark.timeout(200)
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(ranks, name):
    case = CASES[name]
    for r in range(WORLD):
        assert "error" not in ranks[r][name], f"rank {r}:\n{ranks[r][name].get('error')}"
    results = [ranks[r][name] for r in range(WORLD)]
    ref = execute(case, 0, sum(case.split), distributed=False)
    if ref["loss"] is not None:
        assert torch.equal(results[0]["loss"], results[1]["loss"]), "the logged loss differs between ranks"
        assert_close(results[0]["loss"], ref["loss"], case.dtype, "loss value")
    for key, expected in ref["same"].items():
        for r in range(WORLD):
            assert_close(results[r]["same"][key], expected, case.dtype, f"{key} on rank {r}")
    for key, expected in ref["rows"].items():
        assert_close(torch.cat([res["rows"][key] for res in results]), expected, case.dtype, key)
    rows, _ = case.make()
    for key, expected in ref["grads"].items():
        assert expected is not None, f"{key} got no reference gradient"
        local = [res["grads"][key] for res in results]
        if key in rows:  # each row lives on one rank: DDP's applied gradient is the rank's gradient / W
            applied = torch.cat(local) / WORLD
        else:  # a shared parameter: DDP averages over ranks
            applied = sum(local) / WORLD
        assert_close(applied, expected, case.dtype, f"gradient of {key}")
    if case.nbytes is not None:
        assert [res["bytes"] for res in results] == [case.nbytes] * WORLD


# ---------------------------------------------------------------- world size 1 (no process group)
@pytest.mark.parametrize("name", ["contingency-uneven", "ce-uneven-bal1-weight_sum-w1", "ce-even-bal0-count-w0",
                                  "ls-even-gram-norm1", "ls-uneven-gather-norm0", "ls-auto-picks-gather",
                                  "lt-uneven-cb", "soft-ce-even-weighted", "p2ot-uneven-buffer", "p2ot-even",
                                  "collectives-uneven", "head-guided-float32", "ce-empty-both-bal1-count"])
def test_world_size_one_is_the_reference(name):
    """Without a process group the global functions give what plain formulas give on the whole batch:
    values, per-row outputs and gradients, with no communication."""
    assert not dist.is_initialized()
    assert (P.world_size(), P.rank()) == (1, 0)
    case = CASES[name]
    n = sum(case.split)
    got = execute(case, 0, n, distributed=True)
    plain = execute(dataclasses.replace(case, run=lambda rows, shared, _: case.plain(rows, shared)), 0, n, False)
    assert got["bytes"] == 0
    assert (got["loss"] is None) == (plain["loss"] is None)
    if plain["loss"] is not None:
        assert_close(got["loss"], plain["loss"].to(got["loss"].dtype), case.dtype, "loss")
    for part in ("same", "rows"):
        assert set(got[part]) - set(plain[part]) <= {"iterations"}, part
        for key, expected in plain[part].items():
            assert_close(got[part][key], expected, case.dtype, f"{part} {key}")
    empty = plain["loss"] is not None and float(plain["loss"]) == 0.0  # an empty confident set: zero gradients
    for key in case.grad:
        assert plain["grads"][key] is not None and (empty or plain["grads"][key].abs().sum() > 0), key
        assert_close(got["grads"][key], plain["grads"][key], case.dtype, f"gradient of {key}")


def test_world_size_one_collectives_are_copies():
    x = torch.randn(5, 3)
    assert torch.equal(P.all_reduce_sum(x), x) and P.all_reduce_sum(x) is not x
    assert torch.equal(P.all_gather_cat(x), x)
    assert P.COMM.take() == 0


# ---------------------------------------------------------------- pure helpers
def test_shard_batch_contiguous_slices():
    batch = torch.randperm(12)
    parts = [P.shard_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    assert all(len(p) == 4 for p in parts)


def test_shard_batch_rejects_indivisible_batch_and_bad_rank():
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        P.shard_batch(torch.arange(10), 0, 4)
    with pytest.raises(ValueError, match="rank"):
        P.shard_batch(torch.arange(8), 2, 2)


def test_similarity_method_choice_is_the_smaller_message():
    assert D.similarity_messages(38, 3, 7) == {"gather": 380, "gram": 79}
    assert D.choose_similarity_method(38, 3, 7) == "gram"
    assert D.choose_similarity_method(38, 10, 50) == "gather"  # 2280 < 3100
    assert D.choose_similarity_method(52, 10, 50) == "gram"  # 3120 >= 3100


def test_comm_counter_take_resets():
    counter = P.CommCounter()
    counter.record(torch.zeros(3, 4, dtype=torch.float64))
    counter.record(torch.zeros(2, dtype=torch.int64))
    assert (counter.bytes, counter.calls) == (112, 2)
    assert counter.take() == 112 and counter.bytes == 0 and counter.calls == 0
