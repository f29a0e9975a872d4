"""Multi-head self-attention with one backend switch.

`sdpa` (default) lets PyTorch pick flash / memory-efficient / cuDNN kernels on GPU and the math kernel on CPU;
`reference` is the explicit softmax(QK^T / sqrt(d)) V the tests compare every backend with. Later backends
(xformers) register themselves in `BACKENDS`.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, H, N, d) -> (B, H, N, d), written out step by step."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    # Softmax in at least fp32 (bf16/fp16 inputs), in the input's precision when that is higher.
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype) @ v


BACKENDS: Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": F.scaled_dot_product_attention,
    "reference": reference_attention,
}


class Attention(nn.Module):
    """Parameter names `qkv` and `proj` as in timm / the original checkpoints."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"attention backend {name!r} is not available; choose from {sorted(BACKENDS)}")
        self._backend = name
        self._attend = BACKENDS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = self._attend(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))
