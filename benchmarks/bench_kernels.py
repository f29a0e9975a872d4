"""pytest-benchmark suite for the three fused kernels: kernel x provider x mode at M2D shapes (on CPU: tiny shapes,
no triton).

    pytest benchmarks/bench_kernels.py --benchmark-group-by=param:kernel,param:mode
    pytest benchmarks/bench_kernels.py -k noise_mix          # one kernel
"""
import pytest

from kernel_cases import MODES, PROVIDERS  # benchmarks/ is put on sys.path by its conftest

from conftest import bench_case

KERNELS = ["l2norm_mse", "gather_visible", "noise_mix"]  # gather_visible: the masking kernel


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel(benchmark, kernel, provider, mode):
    bench_case(benchmark, kernel, provider, mode)
