"""pytest-benchmark suite for noise_mix: providers x modes at M2D shapes (on CPU: tiny shapes, no triton).

    pytest benchmarks/bench_noise_mix.py --benchmark-group-by=param:mode
"""
import pytest

from kernel_cases import MODES, PROVIDERS  # benchmarks/ is put on sys.path by its conftest

from conftest import bench_case

KERNEL = "noise_mix"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_noise_mix(benchmark, provider, mode):
    bench_case(benchmark, KERNEL, provider, mode)
