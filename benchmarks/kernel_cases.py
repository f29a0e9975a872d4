"""Benchmark cases for the hot-path kernels, shared by the pytest-benchmark suites and the device suite.

A case = inputs at M2D shapes + one callable per (provider, mode) + per mode the bytes it must move at minimum
(each input read once, each output written once: the figure achieved GB/s are computed from) beside the bytes the
Triton path issues by its design (recomputing backwards re-read their inputs; the backward of a split output
assembles the gradient first), so the device suite states both. Providers: `triton`, `eager` (the reference), `compile`
(torch.compile of the reference). Modes: `forward`, `backward` (grads from a kept graph), `full`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, NamedTuple, Tuple

import torch

from fastm2d import kernels

PROVIDERS = ("triton", "eager", "compile")


class Traffic(NamedTuple):
    """Bytes of one mode: at minimum, and as the Triton kernels issue them."""
    minimum: int
    issued: int
MODES = ("forward", "backward", "full")
# (batch, tokens N, width D) at M2D ViT-B 80x608 16x16, mask 0.7; `tiny` keeps the CPU dry run quick.
SIZES = {"m2d": (512, 190, 768), "tiny": (2, 190, 64)}


def shape(size) -> Tuple[int, int, int]:
    """(batch, tokens N, width D): a named size, or the tuple itself (the kernel sweep's sizes)."""
    return SIZES[size] if isinstance(size, str) else tuple(size)


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
    b, n, d = shape(size)
    m = n - int(n * 0.3)  # masked tokens
    pred = torch.randn(b, m, d, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(b, m, d, device=device, dtype=dtype)
    fn = _impl(provider, "l2norm_mse")
    n = pred.numel() * pred.element_size()
    # forward reads pred and target; backward reads both again (it recomputes the row) and writes d pred; `full` is
    # one pass of each, where a fused forward-backward would read each input once.
    moved = {"forward": Traffic(2 * n, 2 * n), "backward": Traffic(3 * n, 3 * n), "full": Traffic(3 * n, 5 * n)}
    return _modes(lambda: (fn(pred, target), [pred])), moved


def noise_mix_case(provider, size, dtype, device):
    b = shape(size)[0]
    x = (torch.randn(b, 1, 80, 608, device=device) - 7).to(dtype).requires_grad_()
    bg = (torch.randn(b, 1, 80, 608, device=device) - 6).to(dtype)
    fn = _impl(provider, "noise_mix")
    n = x.numel() * x.element_size()
    # forward: x, bg in, mix out. backward: x, bg, d out in, d x out; the kernel also writes d bg (unused here).
    moved = {"forward": Traffic(3 * n, 3 * n), "backward": Traffic(4 * n, 5 * n), "full": Traffic(5 * n, 8 * n)}
    return _modes(lambda: (fn(x, bg, 0.3, -7.1, -6.0, 4.2), [x])), moved


def masking_case(provider, size, dtype, device):
    b, n, d = shape(size)
    k = int(n * 0.3)
    x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, n, d, device=device, dtype=dtype)
    ids = torch.argsort(torch.rand(b, n, device=device), dim=1)
    fn = _impl(provider, "gather_visible")

    def run():
        vis, msk = fn(x, pos, ids, k)
        return torch.cat([vis, msk], dim=1), [x]

    n = x.numel() * x.element_size()
    table = pos.numel() * pos.element_size()
    # forward: x in (+ the position table once), the tokens out; the kernel reads a position row per token (n).
    # backward: the visible and masked gradients are first assembled into one (B, N, D) gradient (zeros written,
    # both parts copied in: 3n), then scattered (2n). The benchmark's torch.cat of the two outputs is not counted.
    moved = {"forward": Traffic(2 * n + table, 3 * n), "backward": Traffic(2 * n, 5 * n),
             "full": Traffic(3 * n + table, 8 * n)}
    return _modes(run), moved


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
    return {"forward": step, "backward": step, "full": step}, {m: Traffic(3 * nbytes, 3 * nbytes) for m in MODES}


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
