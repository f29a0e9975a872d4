"""M2D loss (paper eq. 2): per-token standardised target, l2-normalised prediction and target, 2 - 2 cos.

`l2norm_mse_reference` is the definition; `l2norm_mse_triton` computes the same in one pass per token row
(standardise, both norms, the dot product) and its backward recomputes the row instead of storing it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import (HAVE_TRITON, check_float, cpu_kernel, fitting_tiles, next_pow2, tile_configs, tl,
                      triton, tuning_bench)

STD_EPS = 1e-6  # (t - mean) / sqrt(var + 1e-6), var unbiased as in the original
NORM_EPS = 1e-12  # F.normalize's floor on the norm


def l2norm_mse_reference(pred: torch.Tensor, target: torch.Tensor, standardize_target: bool = True) -> torch.Tensor:
    """pred, target: (..., D). Mean over all tokens of ||l2(pred) - l2(std(target))||^2, in fp32 or better."""
    if pred.shape != target.shape:
        raise ValueError(f"l2norm_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return _rows_reference(pred, target, standardize_target).mean()


def _standardized(t):
    """(t - mean) / sqrt(var + eps) per row, and that divisor (the backward needs it)."""
    s = (t.var(dim=-1, keepdim=True) + STD_EPS).sqrt()
    return (t - t.mean(dim=-1, keepdim=True)) / s, s


def _rows_reference(p, t, standardize):
    """The loss of each row, 2 - 2 cos, in fp32 or better: the reference's definition and the loss op's CPU kernel."""
    compute = torch.promote_types(p.dtype, torch.float32)
    p, t = p.to(compute), t.to(compute)
    if standardize:
        t = _standardized(t)[0]
    return 2.0 - 2.0 * (F.normalize(p, dim=-1) * F.normalize(t, dim=-1)).sum(dim=-1)


# ROWS rows per program (a 2-D tile of ROWS x BLOCK_D): narrow rows fill the program's warps, wide ones take one
# row each. The autotune set is small and follows the width: ROWS in 1, 2, 4, 8 with ROWS x BLOCK_D <= 4096 elements
# per operand held in registers, warps from that tile's width (kernels/_triton.py `tile_configs`).
if HAVE_TRITON:

    @triton.jit
    def _row_terms(P, T, rows, rmask, D, stride_p, stride_t, STANDARDIZE: tl.constexpr, BLOCK_D: tl.constexpr):
        cols = tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols[None, :] < D)
        p = tl.load(P + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(T + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Four reductions per row held in registers (sum t, sum of squares of the centred t, |p|^2, p.t): the
        # standardised target's norm follows from its centred sum of squares, so it is not summed a second time.
        s = 1.0
        if STANDARDIZE:
            t = tl.where(mask, t - (tl.sum(t, axis=1) / D)[:, None], 0.0)
            sq = tl.sum(t * t, axis=1)
            s = tl.sqrt(sq / (D - 1) + 1e-6)
            t = t / s[:, None]
            tn = tl.maximum(tl.sqrt(sq) / s, 1e-12)
        else:
            tn = tl.maximum(tl.sqrt(tl.sum(t * t, axis=1)), 1e-12)
        pn = tl.maximum(tl.sqrt(tl.sum(p * p, axis=1)), 1e-12)
        cos = tl.sum(p * t, axis=1) / (pn * tn)
        return p, t, s, pn, tn, cos, cols, mask

    @triton.autotune(configs=tile_configs(), key=["D"], prune_configs_by={"early_config_prune": fitting_tiles},
                     do_bench=tuning_bench)
    @triton.jit
    def _l2norm_mse_fwd(P, T, LOSS, R, D, stride_p, stride_t, STANDARDIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                        ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < R
        p, t, s, pn, tn, cos, cols, mask = _row_terms(P, T, rows, rmask, D, stride_p, stride_t, STANDARDIZE, BLOCK_D)
        tl.store(LOSS + rows, 2.0 - 2.0 * cos, mask=rmask)

    @triton.autotune(configs=tile_configs(), key=["D"], prune_configs_by={"early_config_prune": fitting_tiles},
                     do_bench=tuning_bench)
    @triton.jit
    def _l2norm_mse_bwd(P, T, GRAD, DP, DT, R, D, stride_p, stride_t, STANDARDIZE: tl.constexpr,
                        NEED_DT: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < R
        p, t, s, pn, tn, cos, cols, mask = _row_terms(P, T, rows, rmask, D, stride_p, stride_t, STANDARDIZE, BLOCK_D)
        g = tl.load(GRAD + rows, mask=rmask, other=0.0).to(tl.float32) * -2.0  # d loss / d cos of each row
        ph, th = p / pn[:, None], t / tn[:, None]
        dp = (g / pn)[:, None] * (th - cos[:, None] * ph)
        tl.store(DP + rows[:, None] * stride_p + cols[None, :], dp.to(DP.dtype.element_ty), mask=mask)
        if NEED_DT:
            dt = (g / tn)[:, None] * (ph - cos[:, None] * th)
            if STANDARDIZE:  # back through (t - mean) / sqrt(var_unbiased + eps); t holds the standardised row
                dt = tl.where(mask, dt - (tl.sum(dt, axis=1) / D)[:, None]
                              - t * (tl.sum(dt * t, axis=1) / (D - 1))[:, None], 0.0) / s[:, None]
            tl.store(DT + rows[:, None] * stride_t + cols[None, :], dt.to(DT.dtype.element_ty), mask=mask)


# As PyTorch custom ops (torch.library): the loss (one value per token row, fp32) and its backward, with fake
# (shape-only) implementations and the autograd formula registered, so torch.compile keeps them as ops. CUDA runs
# the Triton kernels; CPU the reference formulas (kernels/_triton.py `cpu_kernel`).
def _row_grid(n_rows):
    return lambda meta: (triton.cdiv(n_rows, meta["ROWS"]),)


def _rows_triton(p, t, standardize):
    rows = torch.empty(p.shape[0], device=p.device, dtype=torch.float32)
    _l2norm_mse_fwd[_row_grid(p.shape[0])](p, t, rows, p.shape[0], p.shape[1], p.stride(0), t.stride(0),
                                           STANDARDIZE=standardize, BLOCK_D=next_pow2(p.shape[1]))
    return rows


def _rows_backward_triton(p, t, grad, standardize, need_dt):
    dp = torch.empty_like(p)
    dt = torch.empty_like(t) if need_dt else t.new_empty(0)
    _l2norm_mse_bwd[_row_grid(p.shape[0])](p, t, grad.float().contiguous(), dp, dt if need_dt else dp, p.shape[0],
                                           p.shape[1], p.stride(0), t.stride(0), STANDARDIZE=standardize,
                                           NEED_DT=need_dt, BLOCK_D=next_pow2(p.shape[1]))
    return dp, dt


def _rows_backward_reference(p, t, grad, standardize, need_dt):
    """The kernel's gradient formulas written with PyTorch ops (grad: one value per row; d loss / d cos = -2)."""
    ts, s = _standardized(t.float()) if standardize else (t.float(), None)
    pf = p.float()
    pn = pf.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    tn = ts.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    ph, th = pf / pn, ts / tn
    cos = (ph * th).sum(dim=-1, keepdim=True)
    g = grad.float().unsqueeze(-1) * -2.0
    dp = (g * (th - cos * ph) / pn).to(p.dtype)
    if not need_dt:
        return dp, t.new_empty(0)
    dt = g * (ph - cos * th) / tn
    if standardize:
        d = t.shape[-1]
        dt = (dt - dt.mean(dim=-1, keepdim=True) - ts * (dt * ts).sum(dim=-1, keepdim=True) / (d - 1)) / s
    return dp, dt.to(t.dtype)


loss_rows = torch.library.custom_op("fastm2d::l2norm_mse_rows", mutates_args=(),
                                    schema="(Tensor pred, Tensor target, bool standardize) -> Tensor")(_rows_triton)
loss_rows_backward = torch.library.custom_op(
    "fastm2d::l2norm_mse_rows_backward", mutates_args=(),
    schema="(Tensor pred, Tensor target, Tensor grad, bool standardize, bool need_dt) -> (Tensor, Tensor)",
)(_rows_backward_triton)
loss_rows.register_kernel("cpu")(cpu_kernel(_rows_triton, _rows_reference))
loss_rows_backward.register_kernel("cpu")(cpu_kernel(_rows_backward_triton, _rows_backward_reference))


@loss_rows.register_fake
def _(p, t, standardize):
    return p.new_empty(p.shape[0], dtype=torch.float32)


@loss_rows_backward.register_fake
def _(p, t, grad, standardize, need_dt):
    return torch.empty_like(p), (torch.empty_like(t) if need_dt else t.new_empty(0))


def _save_rows(ctx, inputs, output):
    p, t, standardize = inputs
    ctx.save_for_backward(p, t)
    ctx.standardize = standardize


def _rows_grad(ctx, grad_rows):
    p, t = ctx.saved_tensors
    need_dt = ctx.needs_input_grad[1]
    dp, dt = loss_rows_backward(p, t, grad_rows, ctx.standardize, need_dt)
    return dp, (dt if need_dt else None), None


loss_rows.register_autograd(_rows_grad, setup_context=_save_rows)


def l2norm_mse_triton(pred: torch.Tensor, target: torch.Tensor, standardize_target: bool = True) -> torch.Tensor:
    """Same value and gradients (pred, and target when it requires grad) as the reference; fp32 math inside."""
    if pred.shape != target.shape:
        raise ValueError(f"l2norm_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() < 1 or pred.shape[-1] < 2 or pred.numel() == 0:
        raise ValueError(f"l2norm_mse: need (..., D) with D >= 2 and at least one token, got {tuple(pred.shape)}")
    check_float("l2norm_mse", pred, target)
    d = pred.shape[-1]
    # One row per token; a strided input is copied once (documented cost), a contiguous one is only viewed.
    return loss_rows(pred.reshape(-1, d).contiguous(), target.reshape(-1, d).contiguous(), bool(standardize_target)).mean()
