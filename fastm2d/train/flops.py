"""The speed model of docs/architecture.md in code: training FLOPs per sample and model FLOPs utilisation (MFU).

A ViT layer with n tokens of width d costs 24 n d^2 + 4 n^2 d forward FLOPs (multiply-add = 2). Trained parts
cost 3x forward (forward + backward), the target encoder 1x (forward only). ViT-B 80x608 16x16 at mask 0.7:
online 58 tokens, target 134, predictor 191 at width 512 -> about 85 GFLOP per sample.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..config import ModelConfig

log = logging.getLogger("fastm2d.train")

# MFU, one definition everywhere (README, docs/architecture.md, the device suite): achieved model FLOPs per second
# (train_flops_per_sample x samples/s) / the card's DENSE bf16 tensor-core peak from the vendor's data sheet,
# looked up by the exact name torch.cuda.get_device_name() gives (an H100 PCIe or NVL is not an SXM H100).
# Unknown cards get no MFU until train.peak_tflops names their peak. The target, stated here once and quoted by the
# README, the docs and the device suite: >= 50 % MFU for the recipe's step, i.e. ViT-B 80x608 at 5,800 samples/s on
# one H100 SXM (495 TFLOP/s, ~63 % of the ~790 TFLOP/s a large bf16 matmul measures there); the first milestone
# is 40 % MFU (4,700 samples/s).
PEAK_BF16_DENSE = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100": 989e12,  # some drivers report the SXM part without its memory
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165e12,
}
MFU_TARGET, MFU_MILESTONE = 0.50, 0.40
TARGET_SAMPLES_PER_S = 5800  # ViT-B 80x608 16x16, mask 0.7, one H100 SXM: 50 % MFU (tests/test_flops.py checks it)
MILESTONE_SAMPLES_PER_S = 4700  # the same at 40 % MFU: the first milestone


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
    """The peak used for MFU: the configured figure, else the data-sheet dense bf16 peak of this exact card, else
    None (CPU, or a card not in the table: a warning names it and the setting)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return card_peak(torch.cuda.get_device_name(device))


def card_peak(name: str) -> Optional[float]:
    peak = PEAK_BF16_DENSE.get(name.strip())
    if peak is None:
        log.warning("no data-sheet bf16 peak is known for %r: MFU is not reported; set train.peak_tflops to the "
                    "card's dense bf16 TFLOP/s", name)
    return peak


def mfu(samples_per_s: float, flops_per_sample: float, peak: Optional[float]) -> Optional[float]:
    return samples_per_s * flops_per_sample / peak if peak else None
