"""Masked Modeling Duo (paper III-A): online encoder on visible patches, predictor, EMA target on masked patches.

Key names are the original implementation's (SPEC.md "Checkpoints"): the encoder keys at the top level
(inherited from `ViTEncoder`), `mask_token`, `decoder_*` for the predictor and `target_*` for the target.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .. import kernels
from ..config import ModelConfig
from .pos_embed import sincos_2d
from .vit import ViTEncoder, make_blocks


class M2D(ViTEncoder):
    def __init__(self, cfg: ModelConfig):
        cfg = cfg.resolved()
        super().__init__(cfg)
        # Predictor ("decoder" in the original's names).
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(cfg.decoder_embed_dim, self.grid))
        self.decoder_blocks = make_blocks(cfg.decoder_depth, cfg.decoder_embed_dim, cfg.decoder_num_heads,
                                          cfg.mlp_ratio, cfg.attention)
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.embed_dim)
        # Target encoder: its own blocks and norm, updated only by EMA (see ema.py).
        self.target_blocks = make_blocks(cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.attention)
        self.target_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.init_weights()
        for p in self.target_parameters():
            p.requires_grad_(False)

    @property
    def n_visible(self) -> int:
        return int(self.num_patches * (1 - self.cfg.mask_ratio))  # 57 of 190 at 0.7, as the original rounds

    def online_parameters(self):
        """The parameters the EMA follows, in the same order as `target_parameters`."""
        return [p for m in (self.blocks, self.norm) for p in m.parameters()]

    def target_parameters(self):
        return [p for m in (self.target_blocks, self.target_norm) for p in m.parameters()]

    def random_ids_shuffle(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample random permutation: argsort of uniform noise (visible = the first n_visible)."""
        return torch.argsort(torch.rand(batch, self.num_patches, device=device), dim=1)

    def forward(self, lms: torch.Tensor, ids_shuffle: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """lms: normalised log-mel (B, 1, F, T) of the training size. Returns loss and intermediate tensors."""
        expected = (1, *self.cfg.input_size)
        if lms.dim() != 4 or tuple(lms.shape[1:]) != expected:
            raise ValueError(f"M2D expects (B, {', '.join(map(str, expected))}) log-mel, got {tuple(lms.shape)}")
        ops = kernels.select(self.cfg.kernels, lms.device)
        b, k = lms.shape[0], self.n_visible
        if ids_shuffle is None:
            ids_shuffle = self.random_ids_shuffle(b, lms.device)
        elif ids_shuffle.shape != (b, self.num_patches):
            raise ValueError(f"ids_shuffle must be (B, N) = {(b, self.num_patches)}, got {tuple(ids_shuffle.shape)}")

        patches = self.patch_embed(lms)
        visible, masked = ops.gather_visible(patches, self.pos_embed[:, 1:], ids_shuffle, k)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)

        z_visible = self._run(self.blocks, self.norm, torch.cat([cls, visible], dim=1))
        pred = self._predict(z_visible, ids_shuffle, ops)
        with torch.no_grad():  # the target sees ONLY the masked patches and gets no gradient
            target = self._run(self.target_blocks, self.target_norm, torch.cat([cls, masked], dim=1).detach())[:, 1:]
        loss = ops.l2norm_mse(pred, target)
        return {"loss": loss, "pred": pred, "target": target, "z_visible": z_visible[:, 1:], "ids_shuffle": ids_shuffle}

    @staticmethod
    def _run(blocks: nn.ModuleList, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = blk(x)
        return norm(x)

    def _predict(self, z_visible: torch.Tensor, ids_shuffle: torch.Tensor, ops) -> torch.Tensor:
        """Online visible outputs (B, 1+K, D) -> predictions for the masked positions (B, N-K, D), shuffle order."""
        x = self.decoder_embed(z_visible)
        tokens = ops.unshuffle_with_mask_tokens(x[:, 1:], self.mask_token, self.decoder_pos_embed[:, 1:], ids_shuffle)
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], tokens], dim=1)
        x = self._run(self.decoder_blocks, self.decoder_norm, x)
        # Project only the masked positions: decoder_pred is per token, so this equals the original's order.
        return self.decoder_pred(ops.gather_masked(x[:, 1:], ids_shuffle, self.n_visible))
