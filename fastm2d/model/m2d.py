"""Masked Modeling Duo (paper III-A): online encoder on visible patches, predictor, EMA target on masked patches,
and M2D-X's offline branch (paper III-B): every online token, back in patch order, reshaped by eq. 4 and mapped
per frame by `offline_predictor` to the offline task's target. M2D-CLAP (off_loss=clip) replaces that mapper by
`audio_proj` over the mean of the visible tokens, `text_proj` over the caption embedding (an identity when the
caption encoder is as wide as the encoder) and a learnable temperature `logit_scale`, trained by a CLIP loss.

Key names are the original implementation's (docs/spec.md "Checkpoints"): the encoder keys at the top level
(inherited from `ViTEncoder`), `mask_token`, `decoder_*` for the predictor, `target_*` for the target and
`offline_predictor` for M2D-X's mapper; `audio_proj.0/2`, `text_proj` and `logit_scale` for M2D-CLAP.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..phases import phase
from .clip_loss import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, clip_loss
from .pos_embed import sincos_2d
from .projections import mlp
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
        if cfg.off_dim and cfg.off_loss != "clip":  # M2D-X: per-frame mapper from eq. 4 features (F'*D) to the target
            self.offline_predictor = nn.Linear(self.grid[0] * cfg.embed_dim, cfg.off_dim)
        self.init_weights()
        if cfg.off_dim and cfg.off_loss == "clip":  # M2D-CLAP: both sides into the encoder's width. Made after
            # init_weights, as the original adds them after its MAE initialisation (PyTorch's default Linear init)
            self.audio_proj = mlp(cfg.embed_dim, cfg.embed_dim, cfg.embed_dim)
            self.text_proj = nn.Identity() if cfg.off_dim == cfg.embed_dim else nn.Linear(cfg.off_dim, cfg.embed_dim)
            # One element, not the original's 0-dim tensor: DeepSpeed cannot broadcast a 0-dim parameter (it views
            # each as bytes). The state dict keeps the original's 0-dim shape both ways.
            self.logit_scale = nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT))
            self.register_state_dict_post_hook(_logit_scale_saved_0dim)
            self.register_load_state_dict_pre_hook(_logit_scale_loaded_1dim)
        for p in self.target_parameters():
            p.requires_grad_(False)

    @property
    def n_visible(self) -> int:
        if self.cfg.mask_mode == "time":  # whole time columns: every frequency row of a visible column
            return self.grid[0] * (self.grid[1] - int(self.grid[1] * self.cfg.mask_ratio))
        return int(self.num_patches * (1 - self.cfg.mask_ratio))  # 57 of 190 at 0.7, as the original rounds

    @property
    def mask_noise_shape(self) -> int:
        """Uniform noise per sample that `ids_from_noise` turns into a mask: one per patch, or per time column."""
        return self.grid[1] if self.cfg.mask_mode == "time" else self.num_patches

    def ids_from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """(B, mask_noise_shape) uniform noise -> ids_shuffle (B, N), visible first (argsort: small is kept)."""
        order = torch.argsort(noise, dim=1)
        if self.cfg.mask_mode == "random":
            return order
        # time: column order -> token ids, frequency-major tokens (index = f * T' + t); visible columns first.
        f = torch.arange(self.grid[0], device=noise.device)
        return (f.view(1, 1, -1) * self.grid[1] + order.unsqueeze(-1)).flatten(1)

    def online_parameters(self):
        """The parameters the EMA follows, in the same order as `target_parameters`."""
        return [p for m in (self.blocks, self.norm) for p in m.parameters()]

    def target_parameters(self):
        return [p for m in (self.target_blocks, self.target_norm) for p in m.parameters()]

    def random_ids_shuffle(self, batch: int, device: torch.device) -> torch.Tensor:
        """Per-sample random permutation from uniform noise (visible = the first n_visible)."""
        return self.ids_from_noise(torch.rand(batch, self.mask_noise_shape, device=device))

    def forward(self, lms: torch.Tensor, ids_shuffle: Optional[torch.Tensor] = None,
                offline_target: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """lms: normalised log-mel (B, 1, F, T) of the training size; offline_target: M2D-X's target, (B, T', off_dim)
        frame features (distillation) or (B, classes) labels. Returns the losses and intermediate tensors:
        loss = lambda_m2d * loss_m2d + lambda_off * loss_off (loss_off = 0 without a target)."""
        expected = (1, *self.cfg.input_size)
        if lms.dim() != 4 or tuple(lms.shape[1:]) != expected:
            raise ValueError(f"M2D expects (B, {', '.join(map(str, expected))}) log-mel, got {tuple(lms.shape)}")
        ops = kernels.select(self.cfg.kernels, lms.device)
        b, k = lms.shape[0], self.n_visible
        if ids_shuffle is None:
            ids_shuffle = self.random_ids_shuffle(b, lms.device)
        elif ids_shuffle.shape != (b, self.num_patches):
            raise ValueError(f"ids_shuffle must be (B, N) = {(b, self.num_patches)}, got {tuple(ids_shuffle.shape)}")

        with phase("masking"):  # the patch embedding and the visible / masked gathers
            patches = self.patch_embed(lms)
            visible, masked = ops.gather_visible(patches, self.pos_embed[:, 1:], ids_shuffle, k)
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        with phase("online forward"):
            z_visible = self._run(self.blocks, self.norm, torch.cat([cls, visible], dim=1))
        with phase("predictor"):
            pred = self._predict(z_visible, ids_shuffle, ops)
        with phase("target forward"), torch.no_grad():  # the target sees ONLY the masked patches, gets no gradient
            target = self._run(self.target_blocks, self.target_norm, torch.cat([cls, masked], dim=1).detach(),
                               average=self.cfg.target_layers)[:, 1:]
        with phase("loss"):
            loss_m2d = ops.l2norm_mse(pred, target) if self.cfg.loss == "norm_mse" else _standardised_mse(pred, target)
        out = {"pred": pred, "target": target, "z_visible": z_visible[:, 1:], "ids_shuffle": ids_shuffle,
               "loss_m2d": loss_m2d, "loss_off": loss_m2d.new_zeros(())}
        if offline_target is not None:
            if not self.cfg.off_dim:
                raise ValueError("offline_target given, but this model has no offline branch (model.off_dim = 0)")
            with phase("loss"):  # M2D-X's offline branch is part of the loss's slice of the step
                if self.cfg.off_loss == "clip":
                    out["loss_off"] = self.clap_loss(z_visible[:, 1:], offline_target)
                else:
                    out["offline_pred"] = self.offline_predictor(self.online_frames(z_visible[:, 1:], pred,
                                                                                    ids_shuffle, ops))
                    out["loss_off"] = self.offline_loss(out["offline_pred"], offline_target, ops)
        out["loss"] = self.cfg.lambda_m2d * loss_m2d + self.cfg.lambda_off * out["loss_off"]
        return out

    def clap_loss(self, z_visible: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """M2D-CLAP: the mean of the visible online tokens (B, K, D) through audio_proj against the caption
        embeddings (B, off_dim) through text_proj, CLIP loss over the global batch."""
        if captions.shape != (z_visible.shape[0], self.cfg.off_dim):
            raise ValueError(f"caption embeddings {tuple(captions.shape)} do not match (B, off_dim) = "
                             f"{(z_visible.shape[0], self.cfg.off_dim)}")
        audio = self.audio_proj(z_visible.mean(dim=1))
        text = self.text_proj(captions.to(audio.dtype))
        return clip_loss(audio, text, self.logit_scale.exp())

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """After each optimiser step, as the original (CLIP's fix for a temperature that runs away)."""
        if hasattr(self, "logit_scale"):
            self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def online_frames(self, z_visible: torch.Tensor, pred: torch.Tensor, ids_shuffle: torch.Tensor, ops) -> torch.Tensor:
        """Visible outputs (B, K, D) and masked predictions (B, N-K, D), both in ids_shuffle order -> every token in
        patch order -> eq. 4: (B, F'*T', D) -> (B, T', F'*D)."""
        z = ops.restore_order(torch.cat([z_visible, pred.to(z_visible.dtype)], dim=1), ids_shuffle)
        b, _, d = z.shape
        return z.reshape(b, self.grid[0], self.grid[1], d).transpose(1, 2).reshape(b, self.grid[1], -1)

    def offline_loss(self, pred: torch.Tensor, target: torch.Tensor, ops) -> torch.Tensor:
        """norm_mse: eq. 2 per frame against teacher features (B, T', D'); bce / ce: per-frame logits averaged over
        time against (B, C) multi-hot labels / class probabilities."""
        if self.cfg.off_loss == "norm_mse":
            if target.shape != pred.shape:
                raise ValueError(f"offline target {tuple(target.shape)} does not match the offline prediction "
                                 f"{tuple(pred.shape)} (B, T', off_dim)")
            return ops.l2norm_mse(pred, target)
        logits = pred.float().mean(dim=1)
        if target.shape != logits.shape:
            raise ValueError(f"offline labels {tuple(target.shape)} do not match (B, classes) = {tuple(logits.shape)}")
        if self.cfg.off_loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target.float())

    @staticmethod
    def _run(blocks: nn.ModuleList, norm: nn.Module, x: torch.Tensor, average=()) -> torch.Tensor:
        """The blocks then the norm; with `average`, the mean of those blocks' outputs goes to the norm instead
        (the original's target_layers)."""
        kept = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in average:
                kept.append(x)
        return norm(torch.stack(kept).mean(0) if kept else x)

    def _predict(self, z_visible: torch.Tensor, ids_shuffle: torch.Tensor, ops) -> torch.Tensor:
        """Online visible outputs (B, 1+K, D) -> predictions for the masked positions (B, N-K, D), shuffle order."""
        x = self.decoder_embed(z_visible)
        tokens = ops.unshuffle_with_mask_tokens(x[:, 1:], self.mask_token, self.decoder_pos_embed[:, 1:], ids_shuffle)
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], tokens], dim=1)
        x = self._run(self.decoder_blocks, self.decoder_norm, x)
        # Project only the masked positions: decoder_pred is per token, so this equals the original's order.
        return self.decoder_pred(ops.gather_masked(x[:, 1:], ids_shuffle, self.n_visible))


def _logit_scale_saved_0dim(module, state, prefix, local_metadata) -> None:
    key = prefix + "logit_scale"
    if key in state:
        state[key] = state[key].reshape(())


def _logit_scale_loaded_1dim(module, state, prefix, *args) -> None:
    key = prefix + "logit_scale"
    if key in state and state[key].dim() == 0:
        state[key] = state[key].reshape(1)


def _standardised_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's `mse` loss: per-token standardised target, plain squared error averaged over channels."""
    target = target.float()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    return (pred.float() - target).pow(2).mean()
