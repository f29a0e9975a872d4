"""An s3prl upstream expert (the interface SUPERB's downstream tasks call), for any weights `load_encoder` reads:

    expert = UpstreamExpert("m2d_s_vit_base-80x608p80x2-230220/checkpoint-300.pth")
    out = expert([wav1, wav2])          # unpadded 16 kHz waveforms of any lengths
    out["last_hidden_state"]            # (B, T', F'*D), zero past each waveform's own frames
    out["hidden_states"]                # one (B, T', F'*D) per block, the last after the final norm
    expert.get_downsample_rates("hidden_states")   # input samples per output frame (2560 for 16x16 patches)

Padded positions: waveforms of different lengths are never encoded together (attention would mix the padding
into real frames); each length is encoded on its own, batched with the others of the same length, and the
outputs are zero-padded to the longest. The model's normalisation statistics come from its checkpoint.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from ..runtime import load_encoder



class UpstreamExpert(nn.Module):
    def __init__(self, ckpt: str, model_config: str = None, untrained_seed: Optional[int] = None, **kwargs):
        """`untrained_seed`: the same architecture freshly initialised (a baseline row beside the model)."""
        super().__init__()
        self.runtime = load_encoder(ckpt, untrained_seed=untrained_seed)
        self.name = "fastm2d"

    def get_downsample_rates(self, key: str) -> int:
        return self.runtime.frontend.hop_length * self.runtime.cfg.patch_size[1]

    def _frames(self, n_samples: int) -> int:
        return len(self.runtime.frame_times_ms(self.runtime.frontend.num_frames(n_samples)))

    def forward(self, wavs: List[Tensor]) -> Dict[str, object]:
        rt = self.runtime
        device = next(rt.parameters()).device
        by_length = defaultdict(list)
        for i, w in enumerate(wavs):
            by_length[int(w.shape[-1])].append(i)
        t_max = max(self._frames(n) for n in by_length)
        layers = None
        for n, idx in by_length.items():
            batch = torch.stack([wavs[i].reshape(-1) for i in idx]).to(device)
            out = rt.encode(batch, rt.sample_rate, return_layers=True)  # rt.inference()'s arithmetic, fp32 out
            if layers is None:
                layers = [torch.zeros(len(wavs), t_max, z.shape[-1], device=device, dtype=z.dtype) for z in out]
            for full, z in zip(layers, out):
                full[idx, :z.shape[1]] = z
        return {"last_hidden_state": layers[-1], "hidden_states": layers}


def m2d_local(ckpt: str, *args, **kwargs) -> UpstreamExpert:
    """The s3prl hub entry point (s3prl's `*_local(ckpt)` convention)."""
    return UpstreamExpert(ckpt, *args, **kwargs)
