"""Per-step schedules of the paper's recipe: linear warm-up then half-cycle cosine to 0 (MAE), EMA tau."""
from __future__ import annotations

import math


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """lr = base_lr * effective_batch / 256 (the MAE / M2D linear scaling rule)."""
    return base_lr * effective_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
