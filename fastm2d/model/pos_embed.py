"""Fixed 2-D sin-cos position encoding (docs/spec.md "Model"), and its resampling for other input lengths."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions -> (P, dim): [sin(p * w_i), cos(p * w_i)], w_i = 1 / 10000^(i / (dim / 2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(1, [1+] F'*T', dim) table for a frequency-major grid (F', T'): first half time, second half frequency.

    The CLS row is all zeros: CLS carries no position.
    """
    n_f, n_t = grid
    t_idx = torch.arange(n_t).repeat(n_f)  # token f * T' + t has time index t ...
    f_idx = torch.arange(n_f).repeat_interleave(n_t)  # ... and frequency index f
    table = torch.cat([sincos_1d(dim // 2, t_idx), sincos_1d(dim // 2, f_idx)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=table.dtype), table], dim=0)
    return table.float().unsqueeze(0)


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, 1+F'*T', D) table to another grid: trim when only time shrinks, else bicubic over the grid.

    Trimming keeps exact values for shorter inputs (how the original handles short chunks); bicubic
    interpolation is what fine-tuning to a longer input does.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    if new_grid[0] == old_grid[0] and new_grid[1] <= old_grid[1]:  # timm resamples only; trimming is ours
        cls, table = pos_embed[:, :1], pos_embed[:, 1:]
        grid = table.reshape(1, old_grid[0], old_grid[1], table.shape[-1])[:, :, : new_grid[1]]
        return torch.cat([cls, grid.reshape(1, new_grid[0] * new_grid[1], -1)], dim=1)
    from timm.layers import resample_abs_pos_embed
    # (F', T') grid, frequency-major, is timm's (H, W); no antialiasing: the original interpolates plainly
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)
