"""Attention backends: each one that can run here equals the explicit-softmax reference; the others say why not."""
import pytest
import torch

from fastm2d.config import ConfigError
from fastm2d.model.attention import BACKENDS, reference_attention, resolve_attention, unavailable_reason
from fastm2d.train import Trainer


def _qkv(device="cpu", dtype=torch.float32, n=191):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(2, 4, n, 32, device=device, dtype=dtype, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("name", ["sdpa", "auto"])
def test_cpu_backends_equal_reference_forward_and_backward(name):
    q, k, v = _qkv()
    fast = BACKENDS[resolve_attention(name, torch.device("cpu"))](q, k, v)
    grads = torch.autograd.grad(fast.sum(), (q, k, v))
    ref = reference_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert torch.allclose(fast, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_auto_is_sdpa_on_cpu_and_xformers_says_why_not():
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"
    assert "no CPU path" in unavailable_reason("xformers", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="model.attention='xformers'.*CPU"):
        resolve_attention("xformers", torch.device("cpu"))


def test_trainer_refuses_an_unrunnable_backend_at_start_up(tiny_config):
    with pytest.raises(ConfigError, match="xformers"):
        Trainer(tiny_config("model.attention=xformers", "train.device=cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: xformers and fused SDPA kernels run on GPU")
@pytest.mark.parametrize("name", ["sdpa", "xformers", "auto"])
def test_gpu_backends_equal_reference(name):
    reason = unavailable_reason(name, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    q, k, v = _qkv("cuda", torch.bfloat16)
    exact = reference_attention(*(t.double() for t in (q, k, v)))
    plain = reference_attention(q, k, v)
    fast = BACKENDS[resolve_attention(name, torch.device("cuda"))](q, k, v)
    fast_err = (fast.double() - exact).abs().max().item()
    assert fast_err <= 2 * (plain.double() - exact).abs().max().item() + 1e-2


def test_every_attention_choice_has_a_backend():
    from fastm2d.config import ATTENTION_CHOICES
    from fastm2d.model.attention import BACKENDS
    assert set(BACKENDS) == set(ATTENTION_CHOICES)
