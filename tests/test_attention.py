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


def test_xformers_is_chosen_only_when_it_beats_sdpa_beyond_the_timing_noise():
    from fastm2d.model.attention import faster_beyond_noise
    assert faster_beyond_noise({"sdpa": [1.00, 1.04, 0.98], "xformers": [0.97, 0.99, 1.02]}) == "sdpa"  # overlap
    assert faster_beyond_noise({"sdpa": [1.00, 1.04, 0.98], "xformers": [0.90, 0.92, 0.91]}) == "xformers"
    assert faster_beyond_noise({"sdpa": [1.0]}) == "sdpa"


def _rank_times_its_own(rank, world, init_file, out):
    """A rank of a 2-process gloo job resolving `auto` on a 'GPU' whose timing gives each rank another answer."""
    import json

    import torch.distributed as dist

    import fastm2d.model.attention as attention
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    attention._fastest = lambda device: "xformers" if rank == 0 else "sdpa"  # what each rank's timing says
    torch.cuda.get_device_name = lambda *a: "the same card"
    chosen = attention.resolve_attention("auto", torch.device("cuda", 0))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(chosen, f)
    dist.destroy_process_group()


def test_every_rank_runs_the_backend_rank_zero_measured(tmp_path):
    """model.attention=auto timed on every rank could give ranks different kernels; rank 0 decides."""
    import json

    import torch.multiprocessing as mp
    mp.spawn(_rank_times_its_own, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == ["xformers", "xformers"]


def _broken_xformers(monkeypatch, fail_after=0):
    """An xformers that imports but finds no operator (a CUDA 12 wheel on a CUDA 13 machine), from its `fail_after`-th
    call on; and the GPU branch of the availability check (xformers' CPU refusal is the only CPU-specific step)."""
    import fastm2d.model.attention as attention
    calls = []

    def no_operator(q, k, v):
        calls.append(1)
        if len(calls) > fail_after:
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n ...")
        return F.scaled_dot_product_attention(q, k, v)

    import torch.nn.functional as F
    monkeypatch.setitem(attention.BACKENDS, "xformers", no_operator)
    monkeypatch.setattr(attention, "unavailable_reason",
                        lambda name, device: None if name == "sdpa" else attention._probe_fails(name, device))
    return attention


@pytest.mark.parametrize("fail_after", [0, 5], ids=["fails at the probe", "fails while timed"])
def test_auto_falls_back_to_sdpa_with_one_warning_when_xformers_breaks(monkeypatch, caplog, fail_after):
    attention = _broken_xformers(monkeypatch, fail_after)
    with caplog.at_level("WARNING", logger="fastm2d"):
        chosen = attention._fastest(torch.device("cpu"), rounds=1, shape=(1, 2, 16, 8))
    assert chosen == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No operator found" in warnings[0] and "uses sdpa" in warnings[0]


def test_xformers_asked_for_explicitly_fails_in_one_line_naming_the_reason(monkeypatch):
    attention = _broken_xformers(monkeypatch)
    with pytest.raises(RuntimeError) as e:
        attention.resolve_attention("xformers", torch.device("cpu"))
    assert "model.attention='xformers'" in str(e.value) and "No operator found" in str(e.value)
    assert "\n" not in str(e.value)
