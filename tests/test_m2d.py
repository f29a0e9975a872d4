"""The M2D forward pass: who sees what, who gets gradients, and the loss of paper eq. 2."""
import pytest
import torch

from fastm2d.model import M2D
from fastm2d.model.attention import reference_attention

from .conftest import tiny_model_config

SPEC_KEYS = ["norm_stats", "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_norm.weight", "decoder_pred.bias",
             "norm.weight", "target_norm.bias"]
BLOCK_KEYS = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]


def test_parameter_names_are_the_originals():
    m = M2D(tiny_model_config())
    keys = set(m.state_dict())
    for k in SPEC_KEYS:
        assert k in keys
    for prefix in ("blocks.1.", "decoder_blocks.0.", "target_blocks.1."):
        for b in BLOCK_KEYS:
            assert f"{prefix}{b}.weight" in keys and f"{prefix}{b}.bias" in keys
    assert m.state_dict()["pos_embed"].shape == (1, 1 + m.num_patches, 64)


def test_target_sees_only_masked_patches_and_gets_no_gradient():
    m = M2D(tiny_model_config())
    x = torch.randn(2, 1, 80, 64)
    ids = torch.stack([torch.randperm(m.num_patches) for _ in range(2)])
    seen = {}
    m.target_blocks[0].register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0].detach().clone()))
    out = m(x, ids_shuffle=ids)
    k = m.n_visible
    assert seen["x"].shape == (2, 1 + m.num_patches - k, 64)
    # Independently: patch tokens by unfolding the input and applying the conv weight as a matrix.
    patches = x.unfold(2, 16, 16).unfold(3, 16, 16)  # (B, 1, F', T', 16, 16)
    tokens = patches.reshape(2, -1, 256) @ m.patch_embed.proj.weight.reshape(64, -1).T + m.patch_embed.proj.bias
    tokens = tokens + m.pos_embed[:, 1:]
    for s in range(2):
        assert torch.allclose(seen["x"][s, 1:], tokens[s, ids[s, k:]], atol=1e-5)
        assert torch.allclose(seen["x"][s, 0], m.cls_token[0, 0])
    out["loss"].backward()
    assert all(p.grad is None for p in m.target_parameters())
    assert not out["target"].requires_grad
    assert m.patch_embed.proj.weight.grad is not None and m.mask_token.grad is not None


def test_loss_is_eq2_computed_independently():
    m = M2D(tiny_model_config())
    out = m(torch.randn(3, 1, 80, 64))
    p, t = out["pred"].double(), out["target"].double()
    assert p.shape == t.shape == (3, m.num_patches - m.n_visible, 64)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + 1e-6)
    # ||p/|p| - t/|t|||^2 averaged over tokens, written as the squared distance rather than 2 - 2 cos.
    dist = ((p / p.norm(dim=-1, keepdim=True) - t / t.norm(dim=-1, keepdim=True)) ** 2).sum(-1)
    assert torch.allclose(out["loss"].double(), dist.mean(), atol=1e-6)


def test_explicit_ids_make_the_forward_deterministic():
    m = M2D(tiny_model_config())
    x = torch.randn(2, 1, 80, 64)
    ids = torch.stack([torch.randperm(m.num_patches) for _ in range(2)])
    a, b = m(x, ids_shuffle=ids)["loss"], m(x, ids_shuffle=ids)["loss"]
    c = m(x, ids_shuffle=ids.flip(1))["loss"]
    assert a == b and a != c


def test_sdpa_equals_explicit_softmax_reference():
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    assert torch.allclose(reference_attention(q, k, v), ref)
    m = M2D(tiny_model_config())
    x = torch.randn(2, 1, 80, 64)
    ids = torch.stack([torch.randperm(m.num_patches) for _ in range(2)])
    fast = m(x, ids)["loss"]
    m.set_attention("reference")
    assert torch.allclose(fast, m(x, ids)["loss"], atol=1e-5)
    with pytest.raises(ValueError, match="flash"):
        m.set_attention("flash")


def test_bad_inputs_are_clear_errors():
    m = M2D(tiny_model_config())
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(2, 80, 64))
    with pytest.raises(ValueError, match="ids_shuffle"):
        m(torch.randn(2, 1, 80, 64), ids_shuffle=torch.zeros(2, 3, dtype=torch.long))


def test_kernel_switch(monkeypatch):
    from fastm2d import kernels
    assert kernels.select("auto", torch.device("cpu")) is kernels.REFERENCE
    monkeypatch.setenv("FASTM2D_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FASTM2D_KERNELS"):
        kernels.select("auto", torch.device("cpu"))


def test_whole_loss_and_gradients_equal_with_kernels_on_and_off(monkeypatch):
    m = M2D(tiny_model_config())
    x = torch.randn(2, 1, 80, 64)
    ids = torch.stack([torch.randperm(m.num_patches) for _ in range(2)])
    results = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("FASTM2D_KERNELS", mode)  # the environment variable wins over model.kernels
        m.zero_grad(set_to_none=True)
        loss = m(x, ids)["loss"]
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (l_ref, g_ref), (l_tri, g_tri) = results["reference"], results["triton"]
    assert torch.allclose(l_ref, l_tri, atol=1e-6)
    assert g_ref.keys() == g_tri.keys() and "mask_token" in g_ref and "patch_embed.proj.weight" in g_ref
    for name in g_ref:
        assert torch.allclose(g_ref[name], g_tri[name], atol=1e-6, rtol=1e-4), name


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    from fastm2d import kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.select("triton", torch.device("cpu"))
    assert kernels.select("auto", torch.device("cpu")) is kernels.REFERENCE
