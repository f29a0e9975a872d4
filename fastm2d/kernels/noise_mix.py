"""Background-noise mixing in the log-mel domain (paper eq. 5, docs/spec.md "M2D-X"), fused with normalisation.

`noise_mix_reference` is the definition; `noise_mix_triton` does centring, the log-sum-exp mix, the eps floor
and the division by std in one pass over memory (and one for the backward).
"""
from __future__ import annotations

import math

import torch

from ._triton import HAVE_TRITON, block_configs, check_float, cpu_kernel, one_when_interpreted, tl, triton, tuning_bench

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

    @triton.autotune(configs=block_configs(), key=["L"], prune_configs_by={"early_config_prune": one_when_interpreted},
                     do_bench=tuning_bench)
    @triton.jit
    def _noise_mix_fwd(X, BG, ETA, OUT, L, x_mean, bg_mean, inv_std, log_eps, eta_scalar,
                       PER_SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        b, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: B x L may pass 2^31 elements
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < L
        mixed, ex, ey = _mix_terms(X, BG, ETA, b, offs, mask, L, x_mean, bg_mean, PER_SAMPLE, eta_scalar)
        tl.store(OUT + b * L + offs, (tl.maximum(mixed, log_eps) * inv_std).to(OUT.dtype.element_ty), mask=mask)

    @triton.autotune(configs=block_configs(), key=["L"], prune_configs_by={"early_config_prune": one_when_interpreted},
                     do_bench=tuning_bench)
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


# As PyTorch custom ops (torch.library), so torch.compile keeps them as ops: (B, L) rows, `eta_rows` the per-sample
# eta (B,) or None for the scalar `eta`. CUDA runs the Triton kernels; CPU the reference formulas.
def _mix_args(x, x_mean, bg_mean, std, eta):
    return (x.shape[1], float(x_mean), float(bg_mean), 1.0 / float(std), math.log(MIX_EPS), float(eta))


def _mix_triton(x, bg, eta_rows, eta, x_mean, bg_mean, std):
    out = torch.empty_like(x)
    grid = lambda meta: (x.shape[0], triton.cdiv(x.shape[1], meta["BLOCK"]))  # noqa: E731
    _noise_mix_fwd[grid](x, bg, eta_rows if eta_rows is not None else x, out, *_mix_args(x, x_mean, bg_mean, std, eta),
                         PER_SAMPLE=eta_rows is not None)  # ETA is not read for a scalar eta
    return out


def _mix_backward_triton(x, bg, eta_rows, gout, eta, x_mean, bg_mean, std):
    dx, dbg = torch.empty_like(x), torch.empty_like(bg)
    grid = lambda meta: (x.shape[0], triton.cdiv(x.shape[1], meta["BLOCK"]))  # noqa: E731
    _noise_mix_bwd[grid](x, bg, eta_rows if eta_rows is not None else x, gout.contiguous(), dx, dbg,
                         *_mix_args(x, x_mean, bg_mean, std, eta), PER_SAMPLE=eta_rows is not None)
    return dx, dbg


def _mix_reference(x, bg, eta_rows, eta, x_mean, bg_mean, std):
    return noise_mix_reference(x, bg, eta_rows if eta_rows is not None else eta, x_mean, bg_mean, std)


def _mix_backward_reference(x, bg, eta_rows, gout, eta, x_mean, bg_mean, std):
    """The kernel's gradient formulas with PyTorch ops: d/dx = g e_x / (e_x + e_bg), zero under the eps floor."""
    xf, yf = x.float() - x_mean, bg.float() - bg_mean
    e = eta_rows.float().view(-1, 1) if eta_rows is not None else torch.tensor(float(eta), device=x.device)
    m = torch.maximum(xf, yf)
    ex, ey = (1 - e) * torch.exp(xf - m), e * torch.exp(yf - m)
    mixed = m + torch.log(ex + ey)
    g = torch.where(mixed >= math.log(MIX_EPS), gout.float() / float(std), 0.0) / (ex + ey)
    return (g * ex).to(x.dtype), (g * ey).to(bg.dtype)


_SCALARS = "float eta, float x_mean, float bg_mean, float std"
mix = torch.library.custom_op("fastm2d::noise_mix", mutates_args=(),
                              schema=f"(Tensor x, Tensor bg, Tensor? eta_rows, {_SCALARS}) -> Tensor")(_mix_triton)
mix_backward = torch.library.custom_op(
    "fastm2d::noise_mix_backward", mutates_args=(),
    schema=f"(Tensor x, Tensor bg, Tensor? eta_rows, Tensor gout, {_SCALARS}) -> (Tensor, Tensor)",
)(_mix_backward_triton)
mix.register_kernel("cpu")(cpu_kernel(_mix_triton, _mix_reference))
mix_backward.register_kernel("cpu")(cpu_kernel(_mix_backward_triton, _mix_backward_reference))


@mix.register_fake
def _(x, bg, eta_rows, eta, x_mean, bg_mean, std):
    return torch.empty_like(x)


@mix_backward.register_fake
def _(x, bg, eta_rows, gout, eta, x_mean, bg_mean, std):
    return torch.empty_like(x), torch.empty_like(bg)


def _save_mix(ctx, inputs, output):
    x, bg, eta_rows, *scalars = inputs
    ctx.save_for_backward(x, bg, eta_rows)
    ctx.scalars = scalars


def _mix_grad(ctx, gout):
    x, bg, eta_rows = ctx.saved_tensors
    dx, dbg = mix_backward(x, bg, eta_rows, gout, *ctx.scalars)
    return dx, dbg, None, None, None, None, None  # eta is a setting, not learned


mix.register_autograd(_mix_grad, setup_context=_save_mix)




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
    b = x.shape[0]
    eta_rows = eta.float().contiguous() if isinstance(eta, torch.Tensor) else None
    out = mix(x.reshape(b, -1).contiguous(), bg.reshape(b, -1).contiguous(), eta_rows,
              0.0 if eta_rows is not None else float(eta), float(x_mean), float(bg_mean), float(std))
    return out.view(x.shape)
