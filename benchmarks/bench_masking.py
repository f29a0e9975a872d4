"""pytest-benchmark suite for masking: providers x modes at M2D shapes (on CPU: tiny shapes, no triton).

    pytest benchmarks/bench_masking.py --benchmark-group-by=param:mode
"""
import pytest

from kernel_cases import MODES, PROVIDERS  # benchmarks/ is put on sys.path by its conftest

from conftest import bench_case

KERNEL = "gather_visible"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masking(benchmark, provider, mode):
    bench_case(benchmark, KERNEL, provider, mode)
