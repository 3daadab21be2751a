"""Benchmark of the whole per-batch head objective: eager PyTorch, torch.compile, Triton kernels.

One step = class weights from the contingency matrix + L_r + alpha L_m + beta L_s, forward and
backward into the logits of both heads (METHOD.md sections 3 and 4, the authors' code variant: mini
weights from view-1 argmaxes, weight-sum normalisation, class-balanced L_m, cosine similarities).

(a) ``eager``: written like the authors' code: N x N cosine-similarity matrices, bincount, boolean
    indexing and F.cross_entropy.
(b) ``compile``: ``torch.compile`` of (a).
(c) ``fused``: ``mcscale.kernels.head_objective``, the whole step in 3 Triton launches (4 when
    K + M > 128).
(d) ``ops``: the per-op kernels of ``mcscale.kernels`` composed as HeadGuided did before (c): about a
    dozen launches a step.
(c) and (d) run on CUDA only: the CPU interpreter is no speed measurement.

Timing: median over ``repeats`` steps after two warm-up steps (CUDA events on CUDA, wall clock on
CPU); the first step's time (compilation included) is kept as ``first_ms``. ``launches`` is the number
of Triton launches in one step, forward and backward (counted by ``mcscale.kernels.launch_count``;
empty for (a) and (b), whose kernels are not counted). Every row records the device and the torch /
triton versions. ``mcscale bench kernels [--out FILE] [--repeats R] [--threads T]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from mcscale.files import write_csv

SIZES = tuple((n, k, m) for n in (512, 4096) for k, m in ((10, 40), (200, 100), (1000, 200), (1000, 4000)))
DELTA, TAU, ALPHA, BETA = 0.3, 0.99, 0.2, 0.5  # CIFAR-10 r10 settings of METHOD.md section 5
FIELDS = [
    "device", "torch", "triton", "n", "k", "m", "variant", "repeats", "median_ms", "first_ms",
    "speedup_vs_eager", "launches", "peak_mem_mb", "loss", "error",
]

__all__ = ["run", "eager_objective", "fused_objective", "triton_objective", "SIZES"]


def eager_objective(lt1, lm1, lt2, lm2, delta=DELTA, tau=TAU, alpha=ALPHA, beta=BETA):
    """The head objective composed from ``mcscale.objectives.reference`` in eager PyTorch, with L_s by
    the dense N x N cosine-similarity matrices as the authors' code computes it."""
    from mcscale.objectives import reference as ref

    k, m = lt1.shape[1], lm1.shape[1]
    pt1, pm1 = F.softmax(lt1, dim=1), F.softmax(lm1, dim=1)
    with torch.no_grad():
        w = ref.class_weights(ref.contingency(pt1.argmax(dim=1), pm1.argmax(dim=1), k, m), delta, "mini")
    loss_s = ref.similarity_alignment(pt1, pm1, normalize_rows=True, method="dense")
    loss_r, n_t = ref.confident_cross_entropy(lt1, lt2, tau, w)
    loss_m, n_m = ref.confident_cross_entropy(lm1, lm2, tau, None, balance=True)
    if n_t == 0 or n_m == 0:  # the code skips such a batch
        return beta * loss_s
    return loss_r + alpha * loss_m + beta * loss_s


def fused_objective(lt1, lm1, lt2, lm2, delta=DELTA, tau=TAU, alpha=ALPHA, beta=BETA):
    """The same objective from ``mcscale.kernels.head_objective`` (one fused step, no host sync)."""
    from mcscale import kernels as mk

    return mk.head_objective(lt1, lm1, lt2, lm2, tau=tau, delta=delta, alpha=alpha, beta=beta, mode="mini").loss


def triton_objective(lt1, lm1, lt2, lm2, delta=DELTA, tau=TAU, alpha=ALPHA, beta=BETA):
    """The same objective from the per-op kernels of ``mcscale.kernels`` (Gram-form L_s, confident CE)."""
    from mcscale import kernels as mk

    k, m = lt1.shape[1], lm1.shape[1]
    pt1, pm1 = F.softmax(lt1, dim=1), F.softmax(lm1, dim=1)
    with torch.no_grad():
        counts = mk.contingency(lt1.argmax(dim=1), lm1.argmax(dim=1), k, m)
        w = mk.class_weights(counts, delta, "mini")
    loss_s = mk.similarity_alignment(pt1, pm1, normalize_rows=True)
    loss_r, n_t = mk.confident_cross_entropy(lt1, lt2, tau, w)
    loss_m, n_m = mk.confident_cross_entropy(lm1, lm2, tau, None, balance=True)
    if n_t == 0 or n_m == 0:
        return beta * loss_s
    return loss_r + alpha * loss_m + beta * loss_s


def make_inputs(n: int, k: int, m: int, device: str, seed: int = 0):
    """Logits of both heads on both views; about 60 % of the rows are confident above tau = 0.99."""
    g = torch.Generator().manual_seed(seed)

    def head(width):
        x = torch.randn(n, width, generator=g)
        planted = torch.randint(0, width, (n,), generator=g)
        confident = torch.rand(n, generator=g) < 0.6
        x[confident, planted[confident]] += 16.0  # a margin that beats tau even with 4000 classes
        return x

    lt1, lm1 = head(k).to(device).requires_grad_(), head(m).to(device).requires_grad_()
    lt2, lm2 = head(k).to(device), head(m).to(device)
    return lt1, lm1, lt2, lm2


def _step(fn: Callable, inputs) -> float:
    lt1, lm1 = inputs[0], inputs[1]
    lt1.grad = lm1.grad = None
    loss = fn(*inputs)
    loss.backward()
    return float(loss.detach())


def _time_steps(fn: Callable, inputs, repeats: int, cuda: bool, warmup: int = 2):
    """(first-step ms, median ms over repeats, loss, peak MB above the inputs or None).

    Two warm-up steps: torch.compile compiles some graph pieces only on the second call.
    """
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = _step(fn, inputs)
    if cuda:
        torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup - 1):
        _step(fn, inputs)
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            _step(fn, inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            _step(fn, inputs)
            times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
    return first_ms, statistics.median(times), loss, peak


def _environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = (f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads)")
    return {"device": name, "torch": torch.__version__, "triton": triton_version}


def _variants(cuda: bool):
    def compiled():
        torch._dynamo.reset()  # a fresh cache per size: no recompile limit, honest first-call time
        return torch.compile(eager_objective, dynamic=False)

    variants = [("eager", lambda: eager_objective), ("compile", compiled)]
    if cuda:
        variants += [("fused", lambda: fused_objective), ("ops", lambda: triton_objective)]
    return variants


def _launches(name: str, fn: Callable, inputs) -> int | str:
    """Triton launches in one step of a Triton variant; "" for the PyTorch ones (not counted)."""
    if name not in ("fused", "ops"):
        return ""
    from mcscale import kernels as mk

    before = mk.launch_count()
    _step(fn, inputs)
    return mk.launch_count() - before


@contextlib.contextmanager
def _quiet_dynamo():
    """Graph-break warnings (boolean indexing, .item()) are expected here; keep the table readable."""
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(
    out_csv: str,
    device: str | None = None,
    repeats: int = 5,
    sizes: Sequence[tuple[int, int, int]] | None = None,
    threads: int | None = None,
) -> list[dict]:
    """Benchmark every (N, K, M) in ``sizes`` (default: the issue's grid), write a CSV, print a table.

    ``threads`` sets torch's CPU threads for the run (on a busy shared machine one thread avoids
    OpenMP barrier stalls of hundreds of ms that swamp the measurement).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    env = _environment(device)
    rows = []
    try:
        with _quiet_dynamo():
            for n, k, m in sizes or SIZES:
                rows.extend(_run_size(n, k, m, device, cuda, env, repeats))
    finally:
        torch.set_num_threads(saved_threads)
    write_csv(out_csv, FIELDS, rows)
    print(format_table(rows))
    return rows


def _run_size(n: int, k: int, m: int, device: str, cuda: bool, env: dict, repeats: int) -> list[dict]:
    """One row per variant for one (N, K, M); a failing variant records its error instead."""
    rows, eager_ms = [], None
    for name, build in _variants(cuda):
        row = dict(env, n=n, k=k, m=m, variant=name, repeats=repeats)
        try:
            inputs = make_inputs(n, k, m, device)
            fn = build()
            first, median, loss, peak = _time_steps(fn, inputs, repeats, cuda)
            row.update(median_ms=round(median, 3), first_ms=round(first, 1), loss=f"{loss:.6g}",
                       launches=_launches(name, fn, inputs))
            row["peak_mem_mb"] = "" if peak is None else round(peak, 1)
            eager_ms = median if name == "eager" else eager_ms
            if eager_ms:
                row["speedup_vs_eager"] = round(eager_ms / median, 2)
        except Exception as exc:  # a failing variant is a result, not a crash
            message = str(exc).splitlines()[0][:200] if str(exc) else ""
            row["error"] = f"{type(exc).__name__}: {message}"
        finally:
            if cuda:
                torch.cuda.empty_cache()
        rows.append({field: row.get(field, "") for field in FIELDS})
        print(_format_row(rows[-1]), flush=True)
    return rows


_COLUMNS = (("n", 5), ("k", 5), ("m", 5), ("variant", 8), ("median_ms", 10), ("first_ms", 10),
            ("speedup_vs_eager", 8), ("launches", 8), ("peak_mem_mb", 10), ("error", 0))


def _format_row(row: dict) -> str:
    return " ".join(str(row[c]).rjust(w) if w else str(row[c]) for c, w in _COLUMNS).rstrip()


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the rows, headed by the device and versions."""
    if not rows:
        return ""
    head = f"device: {rows[0]['device']} | torch {rows[0]['torch']} | triton {rows[0]['triton']}"
    names = " ".join(("speedup" if c == "speedup_vs_eager" else c).rjust(w) if w else c for c, w in _COLUMNS)
    return "\n".join([head, names] + [_format_row(r) for r in rows])
