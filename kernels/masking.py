"""Random masking: gather visible / masked patch tokens (with the position added) and the predictor's unshuffle.

ids_shuffle (B, N) lists, per sample, the visible token indices first and the masked ones after.
"""
from __future__ import annotations

import torch


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
