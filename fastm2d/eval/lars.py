"""LARS (You et al., 2017, "Large batch training of convolutional networks"), as MAE-family fine-tuning uses it.

Each weight matrix's step is rescaled so that its size is `trust_coefficient` times the weight's own norm: layers
whose gradients are large relative to their weights no longer dominate, which keeps large-batch SGD stable.
Biases and normalisation parameters (1-D) take the plain momentum-SGD step and no weight decay.

Ours, not timm.optim.Lars: timm's trust ratio is eta |w| / (|g| + wd |w|), MAE's (which the M2D family's
fine-tuning recipes inherit) eta |w| / |g + wd w|; they agree only without weight decay (tests/test_eval.py
shows both).
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # weight matrices / kernels: decay, then the layer-wise trust ratio
                    update = update.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), g["trust_coefficient"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(g["momentum"]).add_(update)
                p.add_(buf, alpha=-g["lr"])
        return loss
