"""M2D loss (paper eq. 2): per-token standardised target, l2-normalised prediction and target, 2 - 2 cos."""
from __future__ import annotations

import torch
import torch.nn.functional as F

STD_EPS = 1e-6  # (t - mean) / sqrt(var + 1e-6), var unbiased as in the original


def l2norm_mse_reference(pred: torch.Tensor, target: torch.Tensor, standardize_target: bool = True) -> torch.Tensor:
    """pred, target: (..., D). Mean over all tokens of ||l2(pred) - l2(std(target))||^2, computed in fp32."""
    if pred.shape != target.shape:
        raise ValueError(f"l2norm_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.float(), target.float()
    if standardize_target:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + STD_EPS).sqrt()
    cos = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)
    return (2.0 - 2.0 * cos).mean()
