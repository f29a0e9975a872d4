"""Shared set-up for the pytest-benchmark suites: device, sizes and synchronised timing."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from kernel_cases import CASES  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = "m2d" if DEVICE.type == "cuda" else "tiny"
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def bench_case(benchmark, kernel: str, provider: str, mode: str) -> None:
    if provider == "triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton provider is timed on a GPU only (the CPU interpreter measures NumPy, not the kernel)")
    if provider == "compile" and DEVICE.type != "cuda" and not os.environ.get("FASTM2D_BENCH_COMPILE_CPU"):
        pytest.skip("torch.compile on CPU takes minutes to build; set FASTM2D_BENCH_COMPILE_CPU=1 to include it")
    fns, moved = CASES[kernel](provider, SIZE, DTYPE, DEVICE)
    fn = fns[mode]

    def timed():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    timed()  # warm-up (and compilation for the compile provider)
    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(kernel=kernel, provider=provider, mode=mode, size=SIZE, dtype=str(DTYPE),
                                device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
                                GB_per_s=moved[mode].minimum / benchmark.stats.stats.median / 1e9)
