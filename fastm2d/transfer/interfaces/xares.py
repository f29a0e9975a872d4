"""The X-ARES encoder contract (github.com/jimbozhang/xares, PyPI `xares`), the 2025 benchmark many audio encoders
report on:

    from fastm2d.transfer.interfaces.xares import M2DEncoder
    encoder = M2DEncoder("m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth")
    frames = encoder(audio)            # audio (B, T) at encoder.sampling_rate -> (B, T', encoder.output_dim)

An nn.Module whose class name ends in `Encoder`, with `sampling_rate`, `output_dim` (eq. 4's F'*D) and
`hop_size_in_ms`: one feature frame per patch width, 10 ms log-mel hops x the patch's time width: 16x16 -> 160 ms,
16x4 -> 40 ms, 80x2 -> 20 ms. Any length: audio longer than the model's input (X-ARES tasks run to 10 minutes) is
encoded chunk by chunk at the model's own length, as `Runtime.encode` does. Any weights `load_encoder` reads.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...devices import autocast


class M2DEncoder(nn.Module):
    def __init__(self, weights, device: str = "cpu"):
        super().__init__()
        from ..runtime import load_encoder
        self.runtime = load_encoder(weights).to(device).eval()
        self.sampling_rate = self.runtime.sample_rate
        self.output_dim = self.runtime.feature_dim
        self.hop_size_in_ms = self.runtime.frame_seconds * 1000

    @torch.no_grad()
    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2:
            raise ValueError(f"X-ARES audio is (batch, samples), got shape {tuple(audio.shape)}")
        with autocast(audio.device):  # bf16 where the hardware does it fast (fastm2d/devices.py)
            return self.runtime.encode(audio, self.sampling_rate).float()
