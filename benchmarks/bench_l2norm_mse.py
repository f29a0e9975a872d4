"""pytest-benchmark suite for l2norm_mse: providers x modes at M2D shapes (on CPU: tiny shapes, no triton).

    pytest benchmarks/bench_l2norm_mse.py --benchmark-group-by=param:mode
"""
import pytest

from kernel_cases import MODES, PROVIDERS  # benchmarks/ is put on sys.path by its conftest

from conftest import bench_case

KERNEL = "l2norm_mse"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_l2norm_mse(benchmark, provider, mode):
    bench_case(benchmark, KERNEL, provider, mode)
