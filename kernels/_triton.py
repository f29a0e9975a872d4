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


def row_warps(block: int) -> int:
    """Warps for a program holding `block` elements of a row in registers: 4 up to 1024 (8 fp32 values per thread
    and array), more for wider rows so a thread's share stays the same (a 4096-wide M2D-X teacher row at 4 warps
    needs 128 registers per thread in the loss's backward; at 16, 52: tests/aot_compile_kernels.py reports it)."""
    return min(16, max(4, block // 256))


def copy_warps(block: int, element_bytes: int) -> int:
    """Warps for a program that only moves a `block`-element tile: as many as give each thread one 16-byte vector
    (a 256-wide fp32 tile: 2 warps; bf16: 1), so loads and stores are 128-bit (at 4 warps they were 8 / 4 bytes)."""
    return min(8, max(1, block * element_bytes // (16 * 32)))


def column_block(d: int, widest: int = 1024) -> int:
    """The column tile of a row mover: the largest power of two that divides D (up to `widest`), so every lane has
    work (768 -> 3 tiles of 256, where one tile of next_pow2(768) = 1024 left a quarter of the lanes idle); rows whose
    width has no such divisor of at least 128 take one tile of next_pow2(D)."""
    block = d & -d  # the largest power of two dividing d
    return min(widest, block) if block >= 128 else min(widest, next_pow2(d))


def cpu_kernel(triton_impl, reference_impl):
    """A custom op's CPU kernel: the reference, except under TRITON_INTERPRET=1, where the Triton code itself runs
    interpreted (how the CPU tests check the kernels; the reference would only be compared with itself)."""
    def cpu(*args):
        return triton_impl(*args) if interpreting() else reference_impl(*args)
    return cpu
