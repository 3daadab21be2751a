"""Host-side plumbing shared by the Triton kernels: launching, device checks, dtypes, launch sizes.

The kernels are plain ``@triton.jit`` functions, decorated when their module is imported. Triton's
own ``TRITON_INTERPRET`` knob decides then whether they are compiled or interpreted, as it decided for
the library's helpers (``tl.sum``, ``tl.max``, ...) when ``triton`` was first imported; both must agree,
so set TRITON_INTERPRET before triton is first imported (``import torchvision`` already imports it).
Importing this package needs triton, not CUDA.

Every launch goes through ``launch(kernel, grid, ...)``: it counts launches (``launch_count()``, so
tests and benchmarks can check how many a step makes) and is the one place where a tool may intercept
them (``intercept_launches``; tools/compile_check.py records launches that way instead of running them).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
import triton
import triton.language as tl

__all__ = [
    "launch", "launch_count", "intercept_launches", "interpreting", "check_launchable", "scalar", "accum_dtype",
    "tl_dtype", "split_f64", "warps_for",
]

# TRITON_INTERPRET as triton.jit reads it while this package's kernel modules are imported (right after
# this module), and the mode the library's helpers were decorated in when triton was imported.
_KERNELS_INTERPRETED = bool(triton.knobs.runtime.interpret)
_LIBRARY_INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"

_launches = 0
_intercept: Callable | None = None


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, counted (and handed to the interceptor, if one is set)."""
    global _launches
    _launches += 1
    if _intercept is not None:
        return _intercept(kernel, grid, args, kwargs)
    return kernel[grid](*args, **kwargs)


def launch_count() -> int:
    """Kernel launches made by this process so far (take differences around the code of interest)."""
    return _launches


@contextlib.contextmanager
def intercept_launches(hook: Callable):
    """Within the block, ``hook(kernel, grid, args, kwargs)`` replaces every launch (nothing runs) and
    ``check_launchable`` accepts tensors on any device, so a CPU workload can be recorded anywhere."""
    global _intercept
    saved, _intercept = _intercept, hook
    try:
        yield
    finally:
        _intercept = saved


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (the library's helpers and ours alike)."""
    return _KERNELS_INTERPRETED and _LIBRARY_INTERPRETED


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise unless Triton can run on these tensors: CUDA, or CPU under TRITON_INTERPRET=1."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"mcscale.kernels.{name}: inputs on several devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" or interpreting() or _intercept is not None:
        return
    hint = ""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        hint = " (TRITON_INTERPRET is set, but only after triton or mcscale.kernels was imported: set it before)"
    raise RuntimeError(
        f"mcscale.kernels.{name}: Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
        f"set before triton is first imported (got {device}){hint}; mcscale.objectives has the "
        f"plain PyTorch version"
    )


_SCALARS: dict = {}


def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 1-element device tensor holding ``value`` rounded to ``dtype``.

    Thresholds go through memory because Triton passes Python floats as fp32, and the reference
    compares in float64 (class weights) or in the accumulation dtype (confidence). Caching keeps the
    per-step fill launch away: tau and delta are fixed for a run.
    """
    key = (float(value), dtype, str(device))
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) > 64:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.full((1,), float(value), dtype=dtype, device=device)
    return t


def accum_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the reference's rule)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The Triton accumulation type for a torch accumulation dtype (float32 or float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def split_f64(x: float) -> tuple[float, float]:
    """(hi, lo) fp32 numbers with hi + lo == x to about 48 bits.

    Triton passes Python floats as fp32; kernels that accumulate in fp64 rebuild the constant as
    float64(hi) + float64(lo) so the fp64 path keeps fp64 accuracy.
    """
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, x - hi


def warps_for(elements: int) -> int:
    """num_warps for a tile of this many elements: enough threads, no more than 32 values each."""
    if elements <= 2048:
        return 4
    if elements <= 8192:
        return 8
    return 16
