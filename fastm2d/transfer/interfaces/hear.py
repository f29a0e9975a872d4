"""The HEAR 2021 API (neuralaudio.ai/hear2021-holistic-evaluation-of-audio-representations.html), exactly:

    from fastm2d.transfer.interfaces import hear
    model = hear.load_model("m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth")
    emb, ts = hear.get_timestamp_embeddings(audio, model)   # (n_sounds, n_frames, D), (n_sounds, n_frames) ms
    scene = hear.get_scene_embeddings(audio, model)         # (n_sounds, D)

audio: (n_sounds, n_samples) float in [-1, 1] at `model.sample_rate`, on the model's device, any length (20-minute
sounds are encoded chunk by chunk at the model's own length). Timestamps are each frame's centre in
milliseconds; a scene embedding is the mean of the frame embeddings. `model_file_path=""` reads the weights named
by $FASTM2D_HEAR_WEIGHTS (no weights are downloaded).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor
from ..runtime import load_encoder


BATCH = 16  # sounds per forward pass


class HearModel(torch.nn.Module):
    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime.eval()
        self.sample_rate = runtime.sample_rate
        self.scene_embedding_size = runtime.feature_dim
        self.timestamp_embedding_size = runtime.feature_dim


def load_model(model_file_path: str = "", untrained_seed: Optional[int] = None) -> HearModel:
    """`untrained_seed` (or $FASTM2D_HEAR_UNTRAINED_SEED, for runners that pass the path alone): the same
    architecture freshly initialised, the baseline row beside the model."""
    if untrained_seed is None and os.environ.get("FASTM2D_HEAR_UNTRAINED_SEED", "").strip():
        untrained_seed = int(os.environ["FASTM2D_HEAR_UNTRAINED_SEED"])
    path = model_file_path or os.environ.get("FASTM2D_HEAR_WEIGHTS", "")
    if not path:
        raise ValueError("hear.load_model: pass the weights (model_file_path) or set FASTM2D_HEAR_WEIGHTS; "
                         "fastm2d downloads nothing")
    return HearModel(load_encoder(path, device="cuda" if torch.cuda.is_available() else "cpu",
                                  untrained_seed=untrained_seed))


def _check(audio: Tensor, model: HearModel) -> None:
    if audio.dim() != 2:
        raise ValueError(f"HEAR audio is (n_sounds, n_samples), got shape {tuple(audio.shape)}")


@torch.no_grad()
def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> Tuple[Tensor, Tensor]:
    _check(audio, model)
    rt = model.runtime
    outs = []
    for i in range(0, len(audio), BATCH):
        outs.append(rt.encode(audio[i:i + BATCH], rt.sample_rate))  # in rt.inference()'s arithmetic, fp32 out
    emb = torch.cat(outs) if outs else torch.zeros(0, 0, model.timestamp_embedding_size, device=audio.device)
    n_frames = rt.frontend.num_frames(audio.shape[1])
    ts = rt.frame_times_ms(n_frames).to(device=audio.device, dtype=torch.float32)
    return emb, ts.expand(len(audio), -1).contiguous()


@torch.no_grad()
def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    emb, _ = get_timestamp_embeddings(audio, model)
    return emb.mean(dim=1)
