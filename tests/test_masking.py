"""Random masking: counts, permutations, and the gather/unshuffle reference ops against Python indexing."""
import pytest
import torch

from fastm2d.kernels import gather_masked_reference, gather_visible_reference, unshuffle_with_mask_tokens_reference
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
