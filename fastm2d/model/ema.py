"""EMA target update (paper eq. 3) with the linear tau schedule of docs/spec.md, as one fused multi-tensor op."""
from __future__ import annotations

from typing import Sequence

import torch


def ema_tau(step: int, total_steps: int, start: float = 0.99995, end: float = 0.99999) -> float:
    """tau rises linearly per optimiser step from `start` (step 0) to `end` (step total_steps)."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start + (end - start) * frac


class EMA:
    """target <- tau * target + (1 - tau) * online, over lists of parameters.

    It keeps the Parameter objects and reads their storage at every update, never a `.data` captured once:
    DeepSpeed ZeRO 1/2 re-points each parameter's `.data` into its flat buffers after the EMA is built (and
    again when it loads a checkpoint), and a captured tensor would then be a stale copy that never moves.

    `torch._foreach_lerp_` updates every tensor in place in a few fused launches: no Python loop, no new
    tensors per parameter (the original's slow path).
    """

    def __init__(self, target: Sequence[torch.nn.Parameter], online: Sequence[torch.nn.Parameter]):
        if len(target) != len(online) or any(t.shape != o.shape for t, o in zip(target, online)):
            raise ValueError("EMA: target and online parameter lists do not match")
        self.target, self.online = list(target), list(online)

    @torch.no_grad()
    def update(self, tau: float) -> None:
        # `.detach()` here (not at construction) gives views of whatever storage the parameters hold now.
        torch._foreach_lerp_([t.detach() for t in self.target], [o.detach() for o in self.online], 1.0 - tau)
