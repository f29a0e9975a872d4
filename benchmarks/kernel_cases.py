"""Benchmark cases for the hot-path kernels, shared by the pytest-benchmark suites and the device suite.

A case = inputs at M2D shapes + one callable per (provider, mode) + the bytes each mode must move, so the
device suite can state achieved bandwidth. Providers: `triton`, `eager` (the reference), `compile`
(torch.compile of the reference). Modes: `forward`, `backward` (grads from a kept graph), `full`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import torch

from fastm2d import kernels

PROVIDERS = ("triton", "eager", "compile")
MODES = ("forward", "backward", "full")
# (batch, tokens N, width D) at M2D ViT-B 80x608 16x16, mask 0.7; `tiny` keeps the CPU dry run quick.
SIZES = {"m2d": (512, 190, 768), "tiny": (2, 190, 64)}


def _impl(provider: str, name: str):
    fn = getattr(kernels.REFERENCE if provider != "triton" else kernels.TRITON, name)
    return torch.compile(fn, dynamic=False) if provider == "compile" else fn


def _modes(run: Callable[[], Tuple[torch.Tensor, list]]) -> Dict[str, Callable[[], None]]:
    """forward: run; backward: grads of a graph built once (retain_graph); full: both each call."""
    out, inputs = run()
    grad = torch.ones_like(out)

    def forward():
        run()

    def backward():
        torch.autograd.grad(out, inputs, grad, retain_graph=True)

    def full():
        o, i = run()
        torch.autograd.grad(o, i, torch.ones_like(o))

    return {"forward": forward, "backward": backward, "full": full}


def l2norm_mse_case(provider, size, dtype, device):
    b, n, d = SIZES[size]
    m = n - int(n * 0.3)  # masked tokens
    pred = torch.randn(b, m, d, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(b, m, d, device=device, dtype=dtype)
    fn = _impl(provider, "l2norm_mse")
    moved = {"forward": 2 * pred.numel() * pred.element_size()}
    moved.update(backward=3 * pred.numel() * pred.element_size(), full=5 * pred.numel() * pred.element_size())
    return _modes(lambda: (fn(pred, target), [pred])), moved


def noise_mix_case(provider, size, dtype, device):
    b = SIZES[size][0]
    x = (torch.randn(b, 1, 80, 608, device=device) - 7).to(dtype).requires_grad_()
    bg = (torch.randn(b, 1, 80, 608, device=device) - 6).to(dtype)
    fn = _impl(provider, "noise_mix")
    nbytes = x.numel() * x.element_size()
    moved = {"forward": 3 * nbytes, "backward": 5 * nbytes, "full": 8 * nbytes}
    return _modes(lambda: (fn(x, bg, 0.3, -7.1, -6.0, 4.2), [x])), moved


def masking_case(provider, size, dtype, device):
    b, n, d = SIZES[size]
    k = int(n * 0.3)
    x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, n, d, device=device, dtype=dtype)
    ids = torch.argsort(torch.rand(b, n, device=device), dim=1)
    fn = _impl(provider, "gather_visible")

    def run():
        vis, msk = fn(x, pos, ids, k)
        return torch.cat([vis, msk], dim=1), [x]

    nbytes = x.numel() * x.element_size()
    return _modes(run), {"forward": 2 * nbytes, "backward": 2 * nbytes, "full": 4 * nbytes}


def ema_case(provider, size, dtype, device):
    """The EMA update of a ViT-B (86 M fp32 parameters; 2 M in `tiny`): `_foreach_lerp_` over the parameter
    list (what fastm2d uses) as `eager`, one `lerp_` over flat buffers as `triton` (the bound any flat-buffer
    kernel could reach; adopting it needs parameters that are views of one buffer)."""
    from fastm2d.model import EMA
    from fastm2d.config import ModelConfig
    from fastm2d.model.vit import make_blocks

    cfg = ModelConfig(size="base" if size == "m2d" else "tiny").resolved()
    online = make_blocks(cfg.depth, cfg.embed_dim, cfg.num_heads, 4.0, "sdpa").to(device)
    target = make_blocks(cfg.depth, cfg.embed_dim, cfg.num_heads, 4.0, "sdpa").to(device)
    if provider == "triton":
        flat_t = torch.cat([p.detach().flatten() for p in target.parameters()])
        flat_o = torch.cat([p.detach().flatten() for p in online.parameters()])
        step = lambda: flat_t.lerp_(flat_o, 1e-4)  # noqa: E731
    else:
        ema = EMA(list(target.parameters()), list(online.parameters()))
        step = lambda: ema.update(0.9999)  # noqa: E731
    if provider == "compile":
        step = torch.compile(step)
    nbytes = sum(p.numel() for p in target.parameters()) * 4
    return {"forward": step, "backward": step, "full": step}, {m: 3 * nbytes for m in MODES}


CASES = {"l2norm_mse": l2norm_mse_case, "noise_mix": noise_mix_case, "gather_visible": masking_case, "ema": ema_case}


def time_median(fn: Callable[[], None], device: torch.device, reps: int = 20) -> float:
    """Median seconds per call, synchronised; triton.testing.do_bench on CUDA (flushes L2, warms up)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
