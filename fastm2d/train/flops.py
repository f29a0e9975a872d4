"""The speed model of docs/architecture.md in code: training FLOPs per sample and model FLOPs utilisation (MFU).

A ViT layer with n tokens of width d costs 24 n d^2 + 4 n^2 d forward FLOPs (multiply-add = 2). Trained parts
cost 3x forward (forward + backward), the target encoder 1x (forward only). ViT-B 80x608 16x16 at mask 0.7:
online 58 tokens, target 134, predictor 191 at width 512 -> about 85 GFLOP per sample.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import ModelConfig

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s). Override with train.peak_tflops.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "RTX 4090": 165e12}


def layer_flops(n: int, d: int) -> float:
    return 24 * n * d * d + 4 * n * n * d


def train_flops_per_sample(cfg: ModelConfig) -> float:
    cfg = cfg.resolved()
    n = (cfg.input_size[0] // cfg.patch_size[0]) * (cfg.input_size[1] // cfg.patch_size[1])
    k = int(n * (1 - cfg.mask_ratio))
    d, dd = cfg.embed_dim, cfg.decoder_embed_dim
    patch = 2 * n * cfg.patch_size[0] * cfg.patch_size[1] * d  # the conv as a matmul over every patch
    online = cfg.depth * layer_flops(k + 1, d)
    target = cfg.depth * layer_flops(n - k + 1, d)
    predictor = cfg.decoder_depth * layer_flops(n + 1, dd) + 2 * (k + 1) * d * dd + 2 * (n - k) * dd * d
    return 3 * (patch + online + predictor) + target


def peak_flops(device: torch.device, override_tflops: Optional[float] = None) -> Optional[float]:
    """The peak used for MFU: the configured figure, else the data-sheet bf16 peak of a known GPU, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def mfu(samples_per_s: float, flops_per_sample: float, peak: Optional[float]) -> Optional[float]:
    return samples_per_s * flops_per_sample / peak if peak else None
