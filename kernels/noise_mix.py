"""Background-noise mixing in the log-mel domain (paper eq. 5, docs/spec.md "M2D-X"), fused with normalisation.

`noise_mix_reference` is the definition; `noise_mix_triton` does centring, the log-sum-exp mix, the eps floor
and the division by std in one pass over memory (and one for the backward).
"""
from __future__ import annotations

import math

import torch

from ._triton import HAVE_TRITON, check_float, tl, triton

MIX_EPS = float(torch.finfo(torch.float32).eps)


def noise_mix_reference(x: torch.Tensor, bg: torch.Tensor, eta, x_mean: float = 0.0, bg_mean: float = 0.0,
                        std: float = 1.0) -> torch.Tensor:
    """log(max((1 - eta) exp(x - x_mean) + eta exp(bg - bg_mean), eps)) / std, via log-sum-exp (no overflow).

    eta: a float or a per-sample (B,) tensor; x, bg: (B, ...) log-mel.
    """
    if x.shape != bg.shape:
        raise ValueError(f"noise_mix: x {tuple(x.shape)} and bg {tuple(bg.shape)} differ")
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)  # fp32 for half inputs, float64 stays float64
    x, bg = x.to(compute) - x_mean, bg.to(compute) - bg_mean
    eta = torch.as_tensor(eta, dtype=compute, device=x.device)
    if eta.dim() == 1:
        eta = eta.view(-1, *([1] * (x.dim() - 1)))
    # log(a e^x + b e^y) = m + log(a e^(x-m) + b e^(y-m)), m = max(x, y); eta in {0, 1} gives log(0) = -inf terms.
    m = torch.maximum(x, bg)
    mixed = m + torch.log((1 - eta) * torch.exp(x - m) + eta * torch.exp(bg - m))
    return (torch.clamp(mixed, min=math.log(MIX_EPS)) / std).to(dtype)


if HAVE_TRITON:

    @triton.jit
    def _mix_terms(X, BG, ETA, b, offs, mask, L, x_mean, bg_mean, PER_SAMPLE: tl.constexpr, eta_scalar):
        x = tl.load(X + b * L + offs, mask=mask, other=0.0).to(tl.float32) - x_mean
        y = tl.load(BG + b * L + offs, mask=mask, other=0.0).to(tl.float32) - bg_mean
        if PER_SAMPLE:
            eta = tl.load(ETA + b).to(tl.float32)
        else:
            eta = eta_scalar
        m = tl.maximum(x, y)
        ex, ey = (1.0 - eta) * tl.exp(x - m), eta * tl.exp(y - m)  # both <= 1: no overflow at any level
        return m + tl.log(ex + ey), ex, ey

    @triton.jit
    def _noise_mix_fwd(X, BG, ETA, OUT, L, x_mean, bg_mean, inv_std, log_eps, eta_scalar,
                       PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        b, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: B x L may pass 2^31 elements
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        mixed, ex, ey = _mix_terms(X, BG, ETA, b, offs, mask, L, x_mean, bg_mean, PER_SAMPLE, eta_scalar)
        tl.store(OUT + b * L + offs, (tl.maximum(mixed, log_eps) * inv_std).to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _noise_mix_bwd(X, BG, ETA, GOUT, DX, DBG, L, x_mean, bg_mean, inv_std, log_eps, eta_scalar,
                       PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        b, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        mixed, ex, ey = _mix_terms(X, BG, ETA, b, offs, mask, L, x_mean, bg_mean, PER_SAMPLE, eta_scalar)
        g = tl.load(GOUT + b * L + offs, mask=mask, other=0.0).to(tl.float32) * inv_std
        g = tl.where(mixed >= log_eps, g, 0.0) / (ex + ey)  # the eps floor passes no gradient
        tl.store(DX + b * L + offs, (g * ex).to(DX.dtype.element_ty), mask=mask)
        tl.store(DBG + b * L + offs, (g * ey).to(DBG.dtype.element_ty), mask=mask)


class _NoiseMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bg, eta, x_mean, bg_mean, std):
        b = x.shape[0]
        xs, bs = x.reshape(b, -1).contiguous(), bg.reshape(b, -1).contiguous()
        per_sample = isinstance(eta, torch.Tensor)
        eta_t = eta.float().contiguous() if per_sample else xs  # ETA is not read for a scalar eta
        args = (xs.shape[1], float(x_mean), float(bg_mean), 1.0 / float(std), math.log(MIX_EPS),
                0.0 if per_sample else float(eta))
        out = torch.empty_like(xs)
        grid = (b, triton.cdiv(xs.shape[1], BLOCK))
        _noise_mix_fwd[grid](xs, bs, eta_t, out, *args, PER_SAMPLE=per_sample, BLOCK=BLOCK)
        ctx.save_for_backward(xs, bs, eta_t)
        ctx.args, ctx.per_sample, ctx.shape = args, per_sample, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, gout):
        xs, bs, eta_t = ctx.saved_tensors
        dx, dbg = torch.empty_like(xs), torch.empty_like(bs)
        grid = (xs.shape[0], triton.cdiv(xs.shape[1], BLOCK))
        _noise_mix_bwd[grid](xs, bs, eta_t, gout.reshape(xs.shape).contiguous(), dx, dbg, *ctx.args,
                             PER_SAMPLE=ctx.per_sample, BLOCK=BLOCK)
        return dx.view(ctx.shape), dbg.view(ctx.shape), None, None, None, None


BLOCK = 1024


def noise_mix_triton(x: torch.Tensor, bg: torch.Tensor, eta, x_mean: float = 0.0, bg_mean: float = 0.0,
                     std: float = 1.0) -> torch.Tensor:
    """The reference's value and gradients (x, bg; eta is a setting, not learned), one fused pass."""
    if x.shape != bg.shape or x.dim() < 1:
        raise ValueError(f"noise_mix: x {tuple(x.shape)} and bg {tuple(bg.shape)} must have one (B, ...) shape")
    check_float("noise_mix", x, bg)
    if x.dtype != bg.dtype:
        raise TypeError(f"noise_mix: x is {x.dtype} but bg is {bg.dtype}")
    if isinstance(eta, torch.Tensor) and eta.dim() == 0:
        eta = float(eta)
    if isinstance(eta, torch.Tensor) and (eta.shape != (x.shape[0],) or eta.device != x.device):
        raise ValueError(f"noise_mix: per-sample eta must be ({x.shape[0]},) on {x.device}, got "
                         f"{tuple(eta.shape)} on {eta.device}")
    return _NoiseMix.apply(x, bg, eta, x_mean, bg_mean, std)
