"""Random masking: gather visible / masked patch tokens (with the position added) and the predictor's unshuffle.

ids_shuffle (B, N) lists, per sample, the visible token indices first and the masked ones after.
The `*_reference` functions are the definitions; the `*_triton` ones move rows with the position added in the
same pass.
"""
from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, check_float, column_block, copy_warps, cpu_kernel, tl, triton


def _gather_rows(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_visible_reference(x: torch.Tensor, pos: torch.Tensor, ids_shuffle: torch.Tensor, n_visible: int):
    """x (B, N, D) patch tokens, pos (1, N, D) -> (visible (B, K, D), masked (B, N-K, D)), position added."""
    x = x + pos
    return _gather_rows(x, ids_shuffle[:, :n_visible]), _gather_rows(x, ids_shuffle[:, n_visible:])


def unshuffle_with_mask_tokens_reference(x_vis: torch.Tensor, mask_token: torch.Tensor, pos: torch.Tensor,
                                         ids_shuffle: torch.Tensor) -> torch.Tensor:
    """Predictor input: visible tokens (B, K, D) + a mask token per masked position, in original order, + pos."""
    b, k, d = x_vis.shape
    n = ids_shuffle.shape[1]
    x = torch.cat([x_vis, mask_token.to(x_vis.dtype).expand(b, n - k, d)], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return _gather_rows(x, ids_restore) + pos


def gather_masked_reference(x: torch.Tensor, ids_shuffle: torch.Tensor, n_visible: int) -> torch.Tensor:
    """Predictor output (B, N, D) in original order -> the masked positions (B, N-K, D) in ids_shuffle order."""
    return _gather_rows(x, ids_shuffle[:, n_visible:])


def restore_order_reference(x: torch.Tensor, ids_shuffle: torch.Tensor) -> torch.Tensor:
    """Tokens (B, N, D) in ids_shuffle order (visible outputs, then predictions) -> the original patch order.
    M2D-X's offline branch reads every token this way before the eq. 4 reshape."""
    return _gather_rows(x, torch.argsort(ids_shuffle, dim=1))


# ------------------------------------------------------------------------------------------- Triton path -----
# ids_shuffle is a per-sample permutation, so every gather has an exact scatter as its backward (each row is
# written once: no atomics) and vice versa. Two row kernels serve all three operations.
if HAVE_TRITON:

    @triton.jit
    def _move_rows(SRC, IDX, ADD, OUT, n_src, n_idx, n_out, D, idx_stride, IDX_ON_SRC: tl.constexpr,
                   HAS_ADD: tl.constexpr, BLOCK_D: tl.constexpr):
        """IDX_ON_SRC: out[b, j] = src[b, idx[b, j]] (+ add[idx]);  else: out[b, idx[b, j]] = src[b, j] (+ add[idx])."""
        pid, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64 row offsets: no 2^31 overflow
        b, j = pid // n_idx, pid % n_idx
        i = tl.load(IDX + b * idx_stride + j).to(tl.int64)
        cols = blk * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < D
        if IDX_ON_SRC:
            src_row, out_row = b * n_src + i, b * n_out + j
        else:
            src_row, out_row = b * n_src + j, b * n_out + i
        v = tl.load(SRC + src_row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            v += tl.load(ADD + i * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + out_row * D + cols, v.to(OUT.dtype.element_ty), mask=mask)


def _rows_dtype(src: torch.Tensor, add) -> torch.dtype:
    """The moved rows' dtype: PyTorch's promotion of src + add, as the reference's `x + pos` gives it (under bf16
    autocast, bf16 tokens plus the fp32 position table are fp32 tokens, as in the original)."""
    return src.dtype if add is None else torch.promote_types(src.dtype, add.dtype)


def _launch(src, idx, add, n_out, gather: bool, out=None):
    b, n_src, d = src.shape
    out = torch.empty(b, n_out, d, device=src.device, dtype=_rows_dtype(src, add)) if out is None else out
    block = column_block(d)
    grid = (b * idx.shape[1], triton.cdiv(d, block))
    _move_rows[grid](src, idx, add if add is not None else src, out, n_src, idx.shape[1], n_out, d, idx.stride(0),
                     IDX_ON_SRC=gather, HAS_ADD=add is not None, BLOCK_D=block,
                     num_warps=copy_warps(block, src.element_size()))
    return out


def _gather(src, idx, add=None):
    return _launch(src, idx, add, idx.shape[1], gather=True)


def _scatter(src, idx, n_out, add=None):
    out = None if idx.shape[1] == n_out else torch.zeros(src.shape[0], n_out, src.shape[2], device=src.device,
                                                         dtype=_rows_dtype(src, add))  # rows no index reaches: 0
    return _launch(src, idx, add, n_out, gather=False, out=out)


# The two row movers as PyTorch custom ops (torch.library): Dynamo and Inductor see an opaque op with a fake
# (shape-only) implementation and a registered autograd formula, so a compiled step keeps them in its graph
# instead of tracing into Triton launches. CUDA runs the Triton kernel; CPU runs the reference (kernels/_triton.py
# `cpu_kernel`). `add` (the position table, (n_src or n_out, D)) gets its gradient too, though M2D's is a buffer.
def _gather_rows_reference(src, idx, add):
    rows = _gather_rows(src.float(), idx)
    if add is not None:
        rows = rows + add.float()[idx]
    return rows.to(_rows_dtype(src, add))


def _scatter_rows_reference(src, idx, add, n_out):
    vals = src.float() + (add.float()[idx] if add is not None else 0)
    out = torch.zeros(src.shape[0], n_out, src.shape[2], device=src.device, dtype=_rows_dtype(src, add))
    return out.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, src.shape[2]), vals.to(out.dtype))


def _gather_rows_triton(src, idx, add):
    """out[b, j] = src[b, idx[b, j]] (+ add[idx[b, j]])."""
    return _gather(src.contiguous(), idx.contiguous(), add.contiguous() if add is not None else None)


def _scatter_rows_triton(src, idx, add, n_out):
    """out[b, idx[b, j]] = src[b, j] (+ add[idx[b, j]]); rows no index reaches are 0."""
    return _scatter(src.contiguous(), idx.contiguous(), n_out, add.contiguous() if add is not None else None)


gather_rows = torch.library.custom_op("fastm2d::gather_rows", mutates_args=(),
                                      schema="(Tensor src, Tensor idx, Tensor? add) -> Tensor")(_gather_rows_triton)
scatter_rows = torch.library.custom_op("fastm2d::scatter_rows", mutates_args=(),
                                       schema="(Tensor src, Tensor idx, Tensor? add, SymInt n_out) -> Tensor"
                                       )(_scatter_rows_triton)
gather_rows.register_kernel("cpu")(cpu_kernel(_gather_rows_triton, _gather_rows_reference))
scatter_rows.register_kernel("cpu")(cpu_kernel(_scatter_rows_triton, _scatter_rows_reference))


@gather_rows.register_fake
def _(src, idx, add):
    return src.new_empty(src.shape[0], idx.shape[1], src.shape[2], dtype=_rows_dtype(src, add))


@scatter_rows.register_fake
def _(src, idx, add, n_out):
    return src.new_empty(src.shape[0], n_out, src.shape[2], dtype=_rows_dtype(src, add))


def _save_for_rows(ctx, inputs, output):
    src, idx, add = inputs[:3]
    ctx.save_for_backward(idx)
    ctx.n_src, ctx.has_add, ctx.src_dtype = src.shape[1], add is not None, src.dtype


def _gather_rows_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    d_rows = scatter_rows(grad, idx, None, ctx.n_src)  # a permutation's rows: an exact scatter, no atomics
    d_add = d_rows.float().sum(0) if ctx.has_add and ctx.needs_input_grad[2] else None
    return d_rows.to(ctx.src_dtype), None, d_add  # the rows' grad in the promoted dtype, src's in its own


def _scatter_rows_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    d_rows = gather_rows(grad, idx, None)
    d_add = None
    if ctx.has_add and ctx.needs_input_grad[2]:  # add reaches only the rows an index names
        d_add = scatter_rows(d_rows, idx, None, grad.shape[1]).float().sum(0)
    return d_rows.to(ctx.src_dtype), None, d_add, None


gather_rows.register_autograd(_gather_rows_backward, setup_context=_save_for_rows)
scatter_rows.register_autograd(_scatter_rows_backward, setup_context=_save_for_rows)


def _check(name, x, ids, n):
    check_float(name, x)
    if x.dim() != 3 or ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.shape[1] != n:
        raise ValueError(f"{name}: expected x (B, *, D) and ids_shuffle (B, {n}), got {tuple(x.shape)} and {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.device != x.device:
        raise TypeError(f"{name}: ids_shuffle must be an integer tensor on {x.device}")


def gather_visible_triton(x, pos, ids_shuffle, n_visible):
    _check("gather_visible", x, ids_shuffle, x.shape[1])
    if pos.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"gather_visible: pos {tuple(pos.shape)} does not fit tokens {tuple(x.shape)}")
    out = gather_rows(x, ids_shuffle, pos.reshape(x.shape[1:]))  # bf16 + fp32 pos -> fp32 rows, as the reference
    return out[:, :n_visible], out[:, n_visible:]


def unshuffle_with_mask_tokens_triton(x_vis, mask_token, pos, ids_shuffle):
    _check("unshuffle_with_mask_tokens", x_vis, ids_shuffle, pos.shape[-2])
    b, k, d = x_vis.shape
    src = torch.cat([x_vis, mask_token.to(x_vis.dtype).expand(b, ids_shuffle.shape[1] - k, d)], dim=1)
    return scatter_rows(src, ids_shuffle, pos.reshape(pos.shape[-2:]), ids_shuffle.shape[1])


def gather_masked_triton(x, ids_shuffle, n_visible):
    _check("gather_masked", x, ids_shuffle, x.shape[1])
    return gather_rows(x, ids_shuffle[:, n_visible:], None)


def restore_order_triton(x, ids_shuffle):
    _check("restore_order", x, ids_shuffle, x.shape[1])
    return scatter_rows(x, ids_shuffle, None, ids_shuffle.shape[1])
