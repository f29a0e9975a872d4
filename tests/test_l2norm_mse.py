"""The fused l2-normalised MSE (Triton, interpreted on CPU) against float64, forward and both gradients."""
import pytest
import torch

from fastm2d.kernels import l2norm_mse_reference, l2norm_mse_triton

from .conftest import ATOL, DTYPES, assert_tolerance_rule


def _grads(fn, pred, target, standardize, weight):
    p, t = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    loss = fn(p, t, standardize)
    (loss * weight).backward()
    return loss.detach(), p.grad, t.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, n, d", [(1, 133, 768), (2, 67, 100), (3, 29, 512)])
@pytest.mark.parametrize("standardize", [True, False])
def test_matches_float64(dtype, b, n, d, standardize):
    g = torch.Generator().manual_seed(b * n + d)
    pred = torch.randn(b, n, d, generator=g).to(dtype)
    target = (torch.randn(b, n, d, generator=g) * 3 + 1).to(dtype)
    exact = _grads(l2norm_mse_reference, pred.double(), target.double(), standardize, 1.0)
    plain = _grads(l2norm_mse_reference, pred, target, standardize, 1.0)
    fast = _grads(l2norm_mse_triton, pred, target, standardize, 1.0)
    for what, f, p, e in zip(("loss", "d pred", "d target"), fast, plain, exact):
        assert f.dtype == p.dtype
        assert_tolerance_rule(f, p, e, ATOL[dtype], what)


def test_upstream_gradient_and_no_target_grad():
    pred = torch.randn(2, 10, 64, requires_grad=True)
    target = torch.randn(2, 10, 64)
    (l2norm_mse_triton(pred, target) * 3.0).backward()
    ref = pred.detach().clone().requires_grad_()
    (l2norm_mse_reference(ref, target) * 3.0).backward()
    assert torch.allclose(pred.grad, ref.grad, atol=1e-7)


def test_strided_input_is_copied_and_bad_input_rejected():
    base = torch.randn(4, 64, 10)
    strided = base.transpose(1, 2)  # (4, 10, 64), not contiguous
    assert torch.allclose(l2norm_mse_triton(strided, strided * 2), l2norm_mse_reference(strided, strided * 2), atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        l2norm_mse_triton(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(TypeError, match="float64"):
        l2norm_mse_triton(torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: repeats the sweep at batch 512 on a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_real_size_on_gpu(dtype):
    pred = torch.randn(512, 133, 768, device="cuda").to(dtype)
    target = torch.randn(512, 133, 768, device="cuda").to(dtype)
    exact = _grads(l2norm_mse_reference, pred.double(), target.double(), True, 1.0)
    plain = _grads(l2norm_mse_reference, pred, target, True, 1.0)
    fast = _grads(l2norm_mse_triton, pred, target, True, 1.0)
    for what, f, p, e in zip(("loss", "d pred", "d target"), fast, plain, exact):
        assert_tolerance_rule(f, p, e, ATOL[dtype], what)


def test_launch_shapes_keep_every_lane_busy_and_wide_rows_in_registers():
    """The row movers tile a row by the largest power of two dividing its width (768 -> 3 x 256: no idle lanes, where
    one 1024 tile left a quarter idle); rows held whole in registers get warps in proportion to their width."""
    from fastm2d.kernels._triton import column_block, row_warps
    assert column_block(768) == 256 and column_block(512) == 512 and column_block(3840) == 256
    assert column_block(100) == 128 and column_block(24) == 32  # no power-of-two divisor >= 128: one padded tile
    assert 768 % column_block(768) == 0 and column_block(4096) == 1024
    assert row_warps(1024) == 4 and row_warps(4096) == 16 and row_warps(64) == 4
