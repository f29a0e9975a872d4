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


TILE_ELEMENTS = 4096  # per operand held in registers by one program: one 4096-wide row at 16 warps (no spills)


def tile_configs():
    """The autotune set of the row kernels: ROWS rows per program x the warps each tile size gets (`row_warps` of
    ROWS x BLOCK_D); `fitting_tiles` keeps, per width, the ones whose tile fits TILE_ELEMENTS."""
    if not HAVE_TRITON:
        return []
    return [triton.Config({"ROWS": rows}, num_warps=warps) for rows in (1, 2, 4, 8) for warps in (4, 8, 16)]


def fitting_tiles(configs, named_args, **kwargs):
    """Per launch width: tiles of at most TILE_ELEMENTS, each with its own warps; under the interpreter only the one
    with the most rows (it exercises the row masks, and there is nothing to time)."""
    block = kwargs["BLOCK_D"]
    fit = [c for c in configs if c.kwargs["ROWS"] * block <= max(block, TILE_ELEMENTS)
           and c.num_warps == row_warps(c.kwargs["ROWS"] * block)]
    return fit[-1:] if interpreting() else fit


def tuning_bench(kernel_call, quantiles):
    """The autotuner's timing: triton.testing.do_bench on a GPU; under the interpreter (no timing to be had) one run."""
    if interpreting():
        kernel_call()
        return [0.0] * len(quantiles)
    import triton.testing
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


def block_configs():
    """The autotune set of the element-wise kernels (noise_mix): 1024, 2048 or 4096 elements per program, warps from
    the block (8 elements per thread: 2048 at 4 warps took 80 registers in the backward, 64 at 8)."""
    if not HAVE_TRITON:
        return []
    return [triton.Config({"BLOCK": block}, num_warps=row_warps(block)) for block in (1024, 2048, 4096)]


def one_when_interpreted(configs, named_args, **kwargs):
    """Every config on a GPU; the first under the interpreter (nothing to time there)."""
    return configs[:1] if interpreting() else configs
