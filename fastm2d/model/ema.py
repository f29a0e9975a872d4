"""EMA target update (paper eq. 3) with the linear tau schedule of SPEC.md, as one fused multi-tensor op."""
from __future__ import annotations

from typing import Sequence

import torch


def ema_tau(step: int, total_steps: int, start: float = 0.99995, end: float = 0.99999) -> float:
    """tau rises linearly per optimiser step from `start` (step 0) to `end` (step total_steps)."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start + (end - start) * frac


class EMA:
    """target <- tau * target + (1 - tau) * online, for lists of parameters captured once.

    `torch._foreach_lerp_` updates every tensor in place in a few fused launches: no Python loop, no new
    tensors per parameter (the original's slow path).
    """

    def __init__(self, target: Sequence[torch.Tensor], online: Sequence[torch.Tensor]):
        if len(target) != len(online) or any(t.shape != o.shape for t, o in zip(target, online)):
            raise ValueError("EMA: target and online parameter lists do not match")
        self.target = [t.data for t in target]
        self.online = [o.data for o in online]

    @torch.no_grad()
    def update(self, tau: float) -> None:
        torch._foreach_lerp_(self.target, self.online, 1.0 - tau)
