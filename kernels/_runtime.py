"""Shared plumbing for the Triton kernels: mode detection, lazy JIT, device checks, launch sizes.

Whether Triton interprets (TRITON_INTERPRET=1) is effectively fixed when ``triton`` is first
imported: the library's own helpers (``tl.sum``, ``tl.max``, ``tl.argmax``, ...) are decorated then,
as compiled or as interpreted functions, and a kernel only works in the same mode as those. Note that
``import torchvision`` already imports triton. So the mode is read from the library itself, and our
kernels are decorated lazily, in that mode, at their first launch.
"""

from __future__ import annotations

import os

import torch

try:  # triton ships with the CUDA torch wheels; a CPU-only torch has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

    class _NoTritonLanguage:
        """Lets the kernel modules import (annotations name tl.constexpr); every call raises first."""

        constexpr = None

        def __getattr__(self, name):
            return None

    tl = _NoTritonLanguage()

__all__ = [
    "triton", "tl", "kernel", "interpreting", "check_launchable", "scalar", "accum_dtype", "split_f64",
    "next_pow2", "cdiv", "warps_for",
]


def interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter (fixed at ``import triton``)."""
    if triton is None:
        return False
    return type(tl.sum).__name__ == "InterpretedFunction"


class LazyKernel:
    """A kernel function wrapped as a Triton kernel on first launch, in the process's mode."""

    def __init__(self, fn):
        self.fn = fn
        self._wrapped = {}

    def __getitem__(self, grid):
        mode = interpreting()
        wrapped = self._wrapped.get(mode)
        if wrapped is None:
            if mode:
                from triton.runtime.interpreter import InterpretedFunction

                wrapped = InterpretedFunction(self.fn)
            else:
                wrapped = triton.runtime.jit.JITFunction(self.fn)
            self._wrapped[mode] = wrapped
        return wrapped[grid]


def kernel(fn) -> LazyKernel:
    """Decorator for kernel entry points (self-contained: they call only triton.language)."""
    return LazyKernel(fn)


def check_launchable(name: str, *tensors: torch.Tensor) -> None:
    """Raise unless Triton can run on these tensors: CUDA, or CPU under TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError(f"mcscale.kernels.{name}: triton is not installed; use mcscale.objectives")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"mcscale.kernels.{name}: inputs on several devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" or interpreting():
        return
    hint = ""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        hint = " (TRITON_INTERPRET is set, but only after triton was imported: set it before that)"
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


def split_f64(x: float) -> tuple[float, float]:
    """(hi, lo) fp32 numbers with hi + lo == x to about 48 bits.

    Triton passes Python floats as fp32; kernels that accumulate in fp64 rebuild the constant as
    float64(hi) + float64(lo) so the fp64 path keeps fp64 accuracy.
    """
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, x - hi


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def warps_for(elements: int) -> int:
    """num_warps for a tile of this many elements: enough threads, no more than 32 values each."""
    if elements <= 2048:
        return 4
    if elements <= 8192:
        return 8
    return 16
