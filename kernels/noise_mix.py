"""Background-noise mixing in the log-mel domain (paper eq. 5, SPEC.md "M2D-X"), fused with normalisation."""
from __future__ import annotations

import math

import torch

MIX_EPS = float(torch.finfo(torch.float32).eps)


def noise_mix_reference(x: torch.Tensor, bg: torch.Tensor, eta, x_mean: float = 0.0, bg_mean: float = 0.0,
                        std: float = 1.0) -> torch.Tensor:
    """log(max((1 - eta) exp(x - x_mean) + eta exp(bg - bg_mean), eps)) / std, via log-sum-exp (no overflow).

    eta: a float or a per-sample (B,) tensor; x, bg: (B, ...) log-mel.
    """
    if x.shape != bg.shape:
        raise ValueError(f"noise_mix: x {tuple(x.shape)} and bg {tuple(bg.shape)} differ")
    dtype = x.dtype
    x, bg = x.float() - x_mean, bg.float() - bg_mean
    eta = torch.as_tensor(eta, dtype=torch.float32, device=x.device)
    if eta.dim() == 1:
        eta = eta.view(-1, *([1] * (x.dim() - 1)))
    # log(a e^x + b e^y) = m + log(a e^(x-m) + b e^(y-m)), m = max(x, y); eta in {0, 1} gives log(0) = -inf terms.
    m = torch.maximum(x, bg)
    mixed = m + torch.log((1 - eta) * torch.exp(x - m) + eta * torch.exp(bg - m))
    return (torch.clamp(mixed, min=math.log(MIX_EPS)) / std).to(dtype)
