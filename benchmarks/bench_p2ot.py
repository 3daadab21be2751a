"""Timing of the P2OT solver (``mcscale.p2ot.p2ot_plan``) at N = 5120, cold start.

    mcscale bench p2ot [--out benchmarks/p2ot_cpu.csv] [--repeats 3] [--device cuda]

Random logits N(0, 3^2) (confident but not saturated predictions), K in {10, 100, 1000}, rho in
{0.1, 0.5, 1.0}, the solver's defaults (eps 0.1, lam 1, tol 1e-6, max_iter 1000). One untimed
warm-up call per device, then ``repeats`` cold-start calls per setting; the CSV records the median
seconds, the iteration count and whether the tolerance was reached, with the device and versions.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from mcscale.objectives.p2ot import p2ot_plan
from mcscale.files import write_csv

N = 5120
KS = (10, 100, 1000)
RHOS = (0.1, 0.5, 1.0)
LOGIT_STD = 3.0
FIELDS = (
    "n", "k", "rho", "median_s", "min_s", "repeats", "iterations", "converged",
    "device", "device_name", "torch", "threads",
)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(logits: torch.Tensor, rho: float) -> tuple[float, dict]:
    """Wall time of one cold-start solve (p2ot_plan syncs every step, so host timing is faithful)."""
    _sync(logits.device)
    start = time.perf_counter()
    _, state = p2ot_plan(logits, rho)
    _sync(logits.device)
    return time.perf_counter() - start, state


def run(out_csv, device=None, repeats: int = 3, n: int = N, ks=KS, rhos=RHOS) -> list[dict]:
    """Time every (K, rho) setting, write ``out_csv`` and return its rows."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator().manual_seed(0)
    _time_once((torch.randn(256, 10, generator=gen) * LOGIT_STD).to(device), 0.5)  # warm-up
    rows = []
    for k in ks:
        logits = (torch.randn(n, k, generator=gen) * LOGIT_STD).to(device)
        for rho in rhos:
            times, state = [], None
            for _ in range(repeats):
                seconds, state = _time_once(logits, rho)
                times.append(seconds)
            rows.append({
                "n": n, "k": k, "rho": rho,
                "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                "repeats": repeats, "iterations": state["iterations"], "converged": state["converged"],
                "device": device.type, "device_name": _device_name(device),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
            })
            shown = ("k", "rho", "median_s", "iterations", "converged")
            print(", ".join(f"{key}={rows[-1][key]}" for key in shown), flush=True)
    write_csv(out_csv, FIELDS, rows)
    return rows
