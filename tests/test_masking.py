"""Random masking: counts, permutations, and the gather/unshuffle reference ops against Python indexing."""
import pytest
import torch

from fastm2d.kernels import (gather_masked_reference, gather_visible_reference, restore_order_reference,
                             unshuffle_with_mask_tokens_reference)
from fastm2d.model import M2D

from .conftest import tiny_model_config


@pytest.mark.parametrize("input_size, patch, ratio, n, k", [
    ([80, 608], [16, 16], 0.7, 190, 57), ([80, 608], [80, 2], 0.6, 304, 121), ([80, 200], [16, 4], 0.7, 250, 75)])
def test_visible_count_is_int_n_times_one_minus_ratio(input_size, patch, ratio, n, k):
    m = M2D(tiny_model_config(input_size=input_size, patch_size=patch, mask_ratio=ratio, depth=1))
    assert (m.num_patches, m.n_visible) == (n, k)


def test_random_ids_are_per_sample_permutations():
    m = M2D(tiny_model_config())
    ids = m.random_ids_shuffle(8, torch.device("cpu"))
    assert ids.shape == (8, m.num_patches)
    assert torch.equal(ids.sort(dim=1).values, torch.arange(m.num_patches).expand(8, -1))
    assert len({tuple(r.tolist()) for r in ids}) == 8  # independent per sample


def test_gather_ops_against_python_indexing():
    b, n, d, k = 3, 11, 5, 4
    x, pos = torch.randn(b, n, d), torch.randn(1, n, d)
    ids = torch.stack([torch.randperm(n) for _ in range(b)])
    vis, msk = gather_visible_reference(x, pos, ids, k)
    for s in range(b):
        for j in range(n):
            want = x[s, ids[s, j]] + pos[0, ids[s, j]]
            got = vis[s, j] if j < k else msk[s, j - k]
            assert torch.allclose(got, want)
    mask_token = torch.randn(1, 1, d)
    full = unshuffle_with_mask_tokens_reference(vis, mask_token, pos, ids)
    for s in range(b):
        for j in range(n):
            src = vis[s, j] if j < k else mask_token[0, 0]
            assert torch.allclose(full[s, ids[s, j]], src + pos[0, ids[s, j]])
    out = gather_masked_reference(full, ids, k)
    assert torch.equal(out, torch.stack([full[s, ids[s, k:]] for s in range(b)]))
    shuffled = torch.cat([vis, msk], dim=1)  # tokens in ids_shuffle order
    restored = restore_order_reference(shuffled, ids)
    for s in range(b):
        for j in range(n):
            assert torch.equal(restored[s, ids[s, j]], shuffled[s, j])
    assert torch.allclose(restored, x + pos)  # visible + masked, back in patch order, is every token


def _pipeline(ops, x, pos, dpos, mask_token, ids, k, w):
    x, mask_token = x.detach().clone().requires_grad_(), mask_token.detach().clone().requires_grad_()
    vis, msk = ops["gather_visible"](x, pos, ids, k)
    full = ops["unshuffle_with_mask_tokens"](vis * 1.5, mask_token, dpos, ids)
    out = ops["gather_masked"](full, ids, k)
    restored = ops["restore_order"](torch.cat([vis, out], dim=1), ids)  # M2D-X's offline branch
    ((out * w).sum() + (msk * msk).sum() + (restored * restored * 0.5).sum()).backward()
    return vis.detach(), msk.detach(), out.detach(), restored.detach(), x.grad, mask_token.grad


def _compare_triton_with_reference(b, n, d, k, dtype, device):
    from fastm2d import kernels
    from .conftest import ATOL, assert_tolerance_rule

    g = torch.Generator(device=device).manual_seed(n + d)
    x, pos = torch.randn(b, n, d, generator=g, device=device).to(dtype), torch.randn(1, n, d, generator=g, device=device)
    dpos = torch.randn(1, n, d, generator=g, device=device)
    mask_token = torch.randn(1, 1, d, generator=g, device=device).to(dtype)
    ids = torch.argsort(torch.rand(b, n, generator=g, device=device), dim=1)
    w = torch.randn(b, n - k, d, generator=g, device=device)
    names = ("gather_visible", "unshuffle_with_mask_tokens", "gather_masked", "restore_order")
    ref = {k_: getattr(kernels.REFERENCE, k_) for k_ in names}
    low = (pos.to(dtype), dpos.to(dtype), mask_token, ids, k, w.to(dtype))
    fast = _pipeline({k_: getattr(kernels.TRITON, k_) for k_ in names}, x, *low)
    plain = _pipeline(ref, x, *low)
    exact = _pipeline(ref, x.double(), pos.double(), dpos.double(), mask_token.double(), ids, k, w.double())
    for what, f, p, e in zip(("visible", "masked", "predicted", "restored", "d x", "d mask_token"), fast, plain, exact):
        assert f.dtype == dtype and f.shape == e.shape
        assert_tolerance_rule(f, p, e, ATOL[dtype], what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, n, d, k", [(1, 190, 64, 57), (2, 67, 100, 20), (1, 250, 32, 75), (1, 304, 24, 121),
                                     (1, 12, 768, 4)])  # 768: three column tiles of 256 per row
def test_triton_masking_ops_match_reference(dtype, b, n, d, k):
    _compare_triton_with_reference(b, n, d, k, dtype, "cpu")


def test_triton_masking_rejects_bad_input():
    from fastm2d import kernels
    with pytest.raises(ValueError, match="ids_shuffle"):
        kernels.TRITON.gather_visible(torch.randn(2, 10, 8), torch.randn(1, 10, 8), torch.zeros(2, 9, dtype=torch.long), 3)
    with pytest.raises(TypeError, match="integer"):
        kernels.TRITON.gather_masked(torch.randn(2, 10, 8), torch.zeros(2, 10), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: repeats the sweep at batch 512 on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d, k", [(190, 768, 57), (250, 768, 75), (304, 512, 121)])
def test_triton_masking_real_size_on_gpu(dtype, n, d, k):
    _compare_triton_with_reference(512, n, d, k, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_row_movers_add_the_fp32_position_in_fp32_as_the_reference(dtype):
    """Under autocast the patch tokens are bf16 and the position table an fp32 buffer: the reference's (and the
    original's) `x + pos` promotes to fp32. The Triton movers once rounded token + position to the tokens' dtype
    (an error of up to 2^-8 relative on every token fed to the encoders); now they give the reference's fp32 rows
    exactly, and the tokens' gradient comes back in the tokens' own dtype."""
    from fastm2d import kernels
    g = torch.Generator().manual_seed(7)
    b, n, d, k = 2, 67, 100, 20
    x = (torch.randn(b, n, d, generator=g) * 30).to(dtype)  # large tokens: rounding x + pos to bf16 is visible
    pos, dpos = torch.randn(1, n, d, generator=g), torch.randn(1, n, d, generator=g)
    mask_token = torch.randn(1, 1, d, generator=g).to(dtype)
    ids = torch.argsort(torch.rand(b, n, generator=g), dim=1)
    outs = {}
    for name, ops in (("triton", kernels.TRITON), ("reference", kernels.REFERENCE)):
        xg = x.clone().requires_grad_()
        vis, msk = ops.gather_visible(xg, pos, ids, k)
        full = ops.unshuffle_with_mask_tokens(vis.to(dtype), mask_token, dpos, ids)
        (vis.double().sum() + (msk.double() ** 2).sum() + full.double().sum()).backward()
        outs[name] = (vis, msk, full, xg.grad)
    for got, want in zip(outs["triton"], outs["reference"]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    vis, msk, full, grad = outs["triton"]
    assert vis.dtype == msk.dtype == full.dtype == torch.float32 and grad.dtype == dtype
    exact = x.double() + pos.double()  # the rounding the old kernels did would show here
    assert torch.equal(vis.double(), torch.gather(exact, 1, ids[:, :k, None].expand(-1, -1, d)).float().double())
