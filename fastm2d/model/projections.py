"""M2D-CLAP's projection heads: audio and text embeddings into one space (Niizumi et al., M2D-CLAP 2024 / 2025).

The released files carry them beside the encoder, in one of these forms (the layouts of the original's
examples/portable_m2d.py, rebuilt here from the tensor shapes alone):

  audio_proj.0/2.*                      an MLP D -> D -> D (D: the encoder's width) over the mean of the encoder's
                                        patch tokens taken flat (the original's flat_features)
  audio_proj.sem_token, .sem_blocks.N.*, .norm.*   the 2025 "semantic" head: a learnable token and N one-head
                                        transformer blocks over those patch tokens; the token's output is the embedding
  text_proj.weight / text_proj.0/2.*    a Linear or an MLP from the text encoder's width; the releases have none:
                                        the original's text projection is an identity when the caption encoder is as
                                        wide as the audio encoder (GTE-base, BERT-base: 768)
  (text_proj without audio_proj: the audio side is the token mean itself)
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..errors import CheckpointError


def sub_state(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SemanticProjector(nn.Module):
    """A learnable token prepended to the frame features, one-head blocks, the token's output normalised."""

    def __init__(self, dim: int, depth: int, mlp_ratio: float):
        super().__init__()
        from timm.models.vision_transformer import Block  # the original's own block: the same keys and maths
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sem_blocks = nn.ModuleList([Block(dim, 1, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                                         for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sem_token.expand(frames.shape[0], -1, -1), frames], dim=1)
        for block in self.sem_blocks:
            x = block(x)
        return self.norm(x[:, 0])


def build_projection(state: Dict[str, torch.Tensor], prefix: str) -> Optional[nn.Module]:
    """The projection stored under `prefix` (audio_proj. / text_proj.), loaded; None when the file has none."""
    sub = sub_state(state, prefix)
    if not sub:
        return None
    if "sem_token" in sub:
        dim = sub["sem_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sub if k.startswith("sem_blocks."))
        module = SemanticProjector(dim, depth, sub["sem_blocks.0.mlp.fc1.weight"].shape[0] / dim)
    elif "0.weight" in sub and "2.weight" in sub:
        module = mlp(sub["0.weight"].shape[1], sub["0.weight"].shape[0], sub["2.weight"].shape[0])
    elif "weight" in sub:
        module = nn.Linear(sub["weight"].shape[1], sub["weight"].shape[0], bias="bias" in sub)
    else:
        raise CheckpointError(f"{prefix.rstrip('.')}: unknown projection layout (keys {sorted(sub)[:6]})")
    try:
        module.load_state_dict(sub)
    except RuntimeError as e:
        raise CheckpointError(f"{prefix.rstrip('.')}: weights do not fit ({str(e).splitlines()[0]})") from None
    return module.eval()


def attach_projections(module: nn.Module, state: Dict[str, torch.Tensor], path) -> None:
    """Set `module.audio_proj` / `module.text_proj` from a checkpoint's state (M2D-CLAP files only)."""
    for name in ("audio_proj", "text_proj"):
        try:
            proj = build_projection(state, name + ".")
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if proj is not None:
            setattr(module, name, proj)
    if getattr(module, "text_proj", None) is not None and getattr(module, "audio_proj", None) is None:
        module.audio_proj = nn.Identity()  # the 2025 ablations: text projected onto the clip embedding


def audio_embedding(tokens: torch.Tensor, audio_proj: nn.Module) -> torch.Tensor:
    """Patch tokens taken flat (B, N, D) -> the audio embedding in the shared space (B, E), as the original's
    encode_clap_audio computes it: the semantic head reads the tokens; every other form reads their mean."""
    if isinstance(audio_proj, SemanticProjector):
        return audio_proj(tokens)
    return audio_proj(tokens.mean(dim=1))
