"""Shared plumbing for the Triton kernels: mode detection, lazy JIT, device checks, launch sizes.

Whether Triton interprets (TRITON_INTERPRET=1) is effectively fixed when ``triton`` is first
imported: the library's own helpers (``tl.sum``, ``tl.max``, ``tl.argmax``, ...) are decorated then,
as compiled or as interpreted functions, and a kernel only works in the same mode as those. Note that
``import torchvision`` already imports triton. So the mode is read from the library itself, and our
kernels are decorated lazily, in that mode, at their first launch. Device functions shared by several
kernels (``@helper``) are bound the same way: their module-level name holds a placeholder until the
first launch puts the mode's wrapper there (kernels look globals up when they are compiled or run).

Every launch is counted (``launch_count()``), so tests can check how many launches a step makes.
"""

from __future__ import annotations

import os
import sys

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
    "triton", "tl", "kernel", "helper", "bind_helpers", "launch_count", "interpreting", "check_launchable",
    "scalar", "accum_dtype", "split_f64", "next_pow2", "cdiv", "warps_for",
]


def interpreting() -> bool:
    """Whether this process runs Triton kernels in the interpreter (fixed at ``import triton``)."""
    if triton is None:
        return False
    return type(tl.sum).__name__ == "InterpretedFunction"


def _wrap(fn, interpret: bool):
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.runtime.jit.JITFunction(fn)


_LAUNCHES = [0]


def launch_count() -> int:
    """Kernel launches made by this process so far (take differences around the code of interest)."""
    return _LAUNCHES[0]


class LazyKernel:
    """A kernel function wrapped as a Triton kernel on first launch, in the process's mode."""

    def __init__(self, fn):
        self.fn = fn
        self._wrapped = {}

    def __getitem__(self, grid):
        mode = interpreting()
        wrapped = self._wrapped.get(mode)
        if wrapped is None:
            bind_helpers(mode)  # before wrapping: a compiled kernel hashes its callees at first run
            wrapped = self._wrapped[mode] = _wrap(self.fn, mode)
        _LAUNCHES[0] += 1  # `kernel[grid](...)` is always one launch
        return wrapped[grid]


def kernel(fn) -> LazyKernel:
    """Decorator for kernel entry points (they call triton.language and ``@helper`` functions)."""
    return LazyKernel(fn)


class _UnboundHelper:
    """What a helper's name holds before the first launch binds it (calling it is a bug)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.fn.__name__} is a Triton device function: call it from a kernel")


_HELPERS: dict = {}  # function -> every object its names have held (placeholder, then wrappers)
_BOUND: list = [None]  # the mode the helpers are bound in, once bound


def helper(fn):
    """Decorator for a device function called from kernels, bound lazily like the kernels.

    Kernels call it by a module-level name: its own module's, or one imported from there into
    another module of this package (``bind_helpers`` rebinds every such name).
    """
    bound = _UnboundHelper(fn) if _BOUND[0] is None else _wrap(fn, _BOUND[0])
    _HELPERS[fn] = [bound]
    return bound


def bind_helpers(interpret: bool | None = None) -> None:
    """Put the mode's wrapper under every name in this package that holds one of a helper's objects."""
    mode = interpreting() if interpret is None else interpret
    if _BOUND[0] == mode or triton is None:
        return
    replace = {}
    for fn, held in _HELPERS.items():
        wrapper = _wrap(fn, mode)
        replace.update({id(obj): wrapper for obj in held})
        held.append(wrapper)  # kept alive, so the ids above stay unique
    package = __name__.rpartition(".")[0]
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        namespace = vars(module)
        for key, value in list(namespace.items()):
            if id(value) in replace:
                namespace[key] = replace[id(value)]
    _BOUND[0] = mode


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
