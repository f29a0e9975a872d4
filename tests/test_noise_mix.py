"""Fused background-noise mixing (Triton, interpreted on CPU) against float64 and paper eq. 5."""
import math

import pytest
import torch

from fastm2d.kernels import noise_mix_reference, noise_mix_triton

from .conftest import ATOL, DTYPES, assert_tolerance_rule


def _run(fn, x, bg, eta, weight, **kw):
    x, bg = x.detach().clone().requires_grad_(), bg.detach().clone().requires_grad_()
    out = fn(x, bg, eta, **kw)
    (out * weight).sum().backward()
    return out.detach(), x.grad, bg.grad


def test_reference_is_paper_eq5_in_float64():
    x, bg = torch.randn(2, 80, 9, dtype=torch.float64) * 2, torch.randn(2, 80, 9, dtype=torch.float64) * 2
    eq5 = torch.log((1 - 0.3) * torch.exp(x) + 0.3 * torch.exp(bg))
    assert torch.allclose(noise_mix_reference(x, bg, 0.3), eq5, atol=1e-12)
    spec = torch.log(0.7 * torch.exp(x + 7.1) + 0.3 * torch.exp(bg + 6.0)) / 4.2  # centred, mixed, / std
    assert torch.allclose(noise_mix_reference(x, bg, 0.3, -7.1, -6.0, 4.2), spec, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 80, 61), (3, 80, 37), (2, 1, 80, 13)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_matches_float64(dtype, shape, per_sample):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 3 - 7).to(dtype)
    bg = (torch.randn(*shape, generator=g) * 3 - 6).to(dtype)
    eta = torch.rand(shape[0], generator=g) if per_sample else 0.3
    weight = torch.randn(*shape, generator=g)
    kw = dict(x_mean=-7.1, bg_mean=-6.0, std=4.2)
    exact = _run(noise_mix_reference, x.double(), bg.double(), eta, weight.double(), **kw)
    plain = _run(noise_mix_reference, x, bg, eta, weight.to(dtype), **kw)
    fast = _run(noise_mix_triton, x, bg, eta, weight.to(dtype), **kw)
    for what, f, p, e in zip(("out", "d x", "d bg"), fast, plain, exact):
        assert f.dtype == dtype
        assert_tolerance_rule(f, p, e, ATOL[dtype], what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_that_overflow_a_naive_exp(dtype):
    x = torch.full((2, 80, 5), 60.0).to(dtype)  # exp(60) overflows fp16 / bf16 ranges of intermediate sums
    bg = torch.full((2, 80, 5), 58.0).to(dtype)
    out = noise_mix_triton(x, bg, 0.2)
    expected = 60 + math.log(0.8 + 0.2 * math.exp(-2))
    assert torch.isfinite(out).all() and abs(out.float().max().item() - expected) < 0.3
    assert noise_mix_triton(torch.full((1, 4), -200.0), torch.full((1, 4), -200.0), 0.5).min() >= math.log(1.19e-7) - 1e-4


def test_bad_inputs():
    with pytest.raises(ValueError, match="eta"):
        noise_mix_triton(torch.randn(2, 8), torch.randn(2, 8), torch.rand(3))
    with pytest.raises(ValueError, match="shape"):
        noise_mix_triton(torch.randn(2, 8), torch.randn(2, 9), 0.1)
    with pytest.raises(TypeError, match="bf"):
        noise_mix_triton(torch.randn(2, 8), torch.randn(2, 8).bfloat16(), 0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: repeats the sweep at batch 512 on a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_real_size_on_gpu(dtype, per_sample):
    shape = (512, 1, 80, 608)
    x = (torch.randn(*shape, device="cuda") * 3 - 7).to(dtype)
    bg = (torch.randn(*shape, device="cuda") * 3 - 6).to(dtype)
    eta = torch.rand(512, device="cuda") if per_sample else 0.3
    weight = torch.randn(*shape, device="cuda")
    kw = dict(x_mean=-7.1, bg_mean=-6.0, std=4.2)
    exact = _run(noise_mix_reference, x.double(), bg.double(), eta, weight.double(), **kw)
    plain = _run(noise_mix_reference, x, bg, eta, weight.to(dtype), **kw)
    fast = _run(noise_mix_triton, x, bg, eta, weight.to(dtype), **kw)
    for what, f, p, e in zip(("out", "d x", "d bg"), fast, plain, exact):
        assert_tolerance_rule(f, p, e, ATOL[dtype], what)
