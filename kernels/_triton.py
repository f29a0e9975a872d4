"""Triton availability and the input checks every kernel shares (clear errors instead of out-of-bounds reads)."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # the package works without Triton; the reference path is always there
    triton = tl = None
    HAVE_TRITON = False

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the kernels with NumPy on CPU tensors (slow; for tests on small grids)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    if not HAVE_TRITON:
        return "Triton is not installed"
    if device.type == "cuda" or interpreting():
        return None
    return f"Triton kernels need a CUDA device (got {device}); on CPU set TRITON_INTERPRET=1 to run them interpreted"


def check_float(name: str, *tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} not supported (use one of {FLOAT_DTYPES})")
        if t.device != device:
            raise ValueError(f"{name}: all inputs must be on one device, got {device} and {t.device}")
    reason = triton_unavailable_reason(device)
    if reason:
        raise RuntimeError(f"{name}: {reason}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cpu_kernel(triton_impl, reference_impl):
    """A custom op's CPU kernel: the reference, except under TRITON_INTERPRET=1, where the Triton code itself runs
    interpreted (how the CPU tests check the kernels; the reference would only be compared with itself)."""
    def cpu(*args):
        return triton_impl(*args) if interpreting() else reference_impl(*args)
    return cpu
