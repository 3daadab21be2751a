"""Compile every kernel launch of a small workload for a GPU target, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not whether they compile: the
compiled frontend is stricter about types, constexpr branches and early returns. This tool runs the
public functions of ``mcscale.kernels`` on CPU tensors with every launch intercepted (recorded, not
run: ``mcscale.kernels._runtime.intercept_launches``), then compiles each distinct launch (signature
and constants as Triton's launcher would specialise them) down to a cubin with the ptxas that ships
with triton. Run it from a checkout, in a process without TRITON_INTERPRET:

    python tools/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

import torch

_POINTER_TYPES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1",
}


def record_launches() -> list:
    """(kernel, args, kwargs) of every launch made by a small mixed workload."""
    import mcscale.kernels as mk
    from mcscale.kernels import _runtime

    recorded = []
    with _runtime.intercept_launches(lambda kernel, grid, args, kwargs: recorded.append((kernel, args, kwargs))):
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (37,), generator=g), torch.randint(0, 40, (37,), generator=g)
        counts = mk.contingency(*labels, 10, 40)
        for mode in ("mini", "maxi"):
            mk.class_weights(counts, 0.3, mode)
        for n, k, m, dtype in [(37, 10, 40, torch.float32), (37, 100, 200, torch.float32),
                               (37, 10, 40, torch.bfloat16), (20, 3, 7, torch.float64)]:
            for normalize in (True, False):
                a = torch.rand(n, k, dtype=dtype).requires_grad_()
                b = torch.rand(n, m, dtype=dtype).requires_grad_()
                mk.similarity_alignment(a, b, normalize).backward()
            for balance in (False, True):
                z = torch.rand(n, k, dtype=dtype).requires_grad_()
                loss, _ = mk.confident_cross_entropy(z, torch.zeros(n, k), 0.3, torch.ones(k), balance)
                loss.backward()
        # the fused objective: one-tile (K + M <= 128) and wide paths, both weight modes and views
        for n, k, m, dtype, mode, view, flags in [
            (37, 10, 40, torch.float32, "mini", "prediction", True),
            (37, 10, 40, torch.bfloat16, "mini", "pseudo", False),
            (37, 100, 20, torch.float32, "maxi", "prediction", True),
            (37, 100, 200, torch.float32, "mini", "prediction", True),
            (37, 100, 200, torch.bfloat16, "maxi", "pseudo", False),
            (20, 3, 7, torch.float64, "mini", "prediction", True),
        ]:
            logits = [torch.rand(n, w, dtype=dtype) for w in (k, m, k, m)]
            logits[0].requires_grad_()
            logits[1].requires_grad_()
            out = mk.head_objective(*logits, tau=0.3, delta=0.3, alpha=0.2, beta=0.5, mode=mode, weight_view=view,
                                    target_normalize="weight_sum" if flags else "count", aux_balance=flags,
                                    normalize_rows=flags)
            out.loss.backward()
    return recorded


def _signature(fn, args, kwargs):
    params = inspect.signature(fn).parameters
    values = dict(zip(params, args), **kwargs)
    signature, constants = {}, {}
    for name, param in params.items():
        value = values[name]
        if "constexpr" in str(param.annotation) or (isinstance(value, int) and value == 1):
            signature[name], constants[name] = "constexpr", value  # Triton specialises ints == 1
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return signature, constants, values.get("num_warps", 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check compiles kernels: run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", args.arch, 32)
    seen, failures = set(), 0
    for kernel, call_args, kwargs in record_launches():
        signature, constants, warps = _signature(kernel.fn, call_args, kwargs)
        name = kernel.fn.__name__
        key = (name, repr(sorted(signature.items())), repr(sorted(constants.items(), key=str)))
        if key in seen:
            continue
        seen.add(key)
        start = time.perf_counter()
        try:
            triton.compile(ASTSource(kernel, signature, constants), target=target, options={"num_warps": warps})
            status = "ok  "
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            status = f"FAIL {type(exc).__name__}: {str(exc)[-600:]}\n    "
        print(f"{status}{name} {time.perf_counter() - start:.1f}s {constants}")
    print(f"{len(seen)} variants, {failures} failed (sm_{args.arch})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
