"""The ViT encoder: patch embedding, pre-norm blocks, fixed sin-cos positions, CLS token.

Attribute names are the original checkpoints' (`patch_embed.proj`, `blocks.<i>.attn.qkv`, `norm` ...), so
their state dicts load without renaming. `M2D` extends this class, which keeps those keys at the top level.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from timm.layers import Mlp
from torch import nn

from ..config import ConfigError, ModelConfig
from .attention import Attention
from .pos_embed import resample_pos_embed, sincos_2d

DEFAULT_NORM_STATS = (-7.1, 4.2)  # AudioSet log-mel mean / std (docs/spec.md); used when a checkpoint has none


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). LayerNorm eps 1e-6, GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, backend=attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def make_blocks(depth: int, dim: int, heads: int, mlp_ratio: float, attention: str) -> nn.ModuleList:
    return nn.ModuleList([Block(dim, heads, mlp_ratio, attention) for _ in range(depth)])


class PatchEmbed(nn.Module):
    """Conv2d(1, D, kernel = stride = patch) over (B, 1, F, T), tokens flattened frequency-major."""

    def __init__(self, patch_size: Tuple[int, int], embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, F', T') -> (B, F'*T', D)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = (cfg.input_size[0] // cfg.patch_size[0], cfg.input_size[1] // cfg.patch_size[1])
        self.num_patches = self.grid[0] * self.grid[1]
        self.register_buffer("norm_stats", torch.tensor(DEFAULT_NORM_STATS, dtype=torch.float32))
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", sincos_2d(cfg.embed_dim, self.grid))
        self.blocks = make_blocks(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.attention)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

    def set_input_frames(self, frames: int) -> None:
        """Another input length (fine-tuning on other clip lengths), as timm's `set_input_size`: the time axis of
        the position table trimmed or bicubically resampled to whole patches of `frames`, the grid and the config
        updated with it."""
        if type(frames) is not int or frames < self.cfg.patch_size[1]:
            raise ConfigError(f"input frames {frames}: at least one patch width ({self.cfg.patch_size[1]} frames, "
                              f"{self.cfg.patch_size[1] * 10} ms) is needed")
        new_t = frames // self.cfg.patch_size[1]
        self.pos_embed = resample_pos_embed(self.pos_embed, self.grid, (self.grid[0], new_t))
        self.cfg.input_size = [self.cfg.input_size[0], new_t * self.cfg.patch_size[1]]
        self.grid = (self.grid[0], new_t)
        self.num_patches = self.grid[0] * new_t

    # -- initialisation (docs/spec.md): xavier-uniform Linear / patch conv as a matrix, N(0, 0.02) tokens ------------
    def init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, p in self.named_parameters():
            if name.endswith("_token"):
                nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_attention(self, backend: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

    # -- full-sequence encoding, used for transfer --------------------------------------------------------------
    def encode_patches(self, lms: torch.Tensor, return_layers: bool = False,
                       valid_columns: Optional[torch.Tensor] = None) -> torch.Tensor | List[torch.Tensor]:
        """(B, 1, F, t) normalised log-mel, t <= the training length -> (B, F'*t', D) without CLS.

        A shorter input uses the first t' columns of the position table. With return_layers, every block's
        output (the last one after the final norm) is returned as a list. valid_columns (B,): each input's patch
        columns that hold audio; the rest are padding no token attends to, so each input's valid tokens come out as
        if it had been encoded alone at its own length (chunks of several lengths in one batch).
        """
        if lms.dim() != 4 or lms.shape[1] != 1 or lms.shape[2] != self.cfg.input_size[0]:
            raise ValueError(f"expected (B, 1, {self.cfg.input_size[0]}, T) log-mel, got {tuple(lms.shape)}")
        x = self.patch_embed(lms)
        n_t = lms.shape[-1] // self.cfg.patch_size[1]
        if n_t > self.grid[1]:
            raise ValueError(f"input of {lms.shape[-1]} frames is longer than the model's {self.cfg.input_size[1]}")
        pos = self.pos_embed[:, 1:].reshape(1, self.grid[0], self.grid[1], -1)[:, :, :n_t].reshape(1, -1, x.shape[-1])
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x + pos], dim=1)
        key_mask = None
        if valid_columns is not None:  # CLS, then the patches frequency-major: column = index % t'
            columns = torch.arange(x.shape[1] - 1, device=x.device) % n_t
            key_mask = torch.cat([torch.ones_like(valid_columns, dtype=torch.bool)[:, None],
                                  columns[None, :] < valid_columns[:, None]], dim=1)
        layers = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, key_mask)
            layers.append(self.norm(x) if i == len(self.blocks) - 1 else x)
        return [y[:, 1:] for y in layers] if return_layers else layers[-1][:, 1:]
