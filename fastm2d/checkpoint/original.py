"""The original implementation's formats: its checkpoints carry their configuration in the parent folder's name
(`<model>-<F>x<T>p<pF>x<pT>[p<sr>]...-<YYMMDD>...`), read here as the original does; wrappers add key prefixes
(DDP, its evaluation package, its RuntimeM2D); classifier heads come in two layouts; sizes are inferred from the
tensor shapes. docs/spec.md "Checkpoints" lists them."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..config import ModelConfig

# Prefixes that wrappers add, longest first: the original's evaluation package (EVAR) saves fine-tuned encoders
# under `module.ar.runtime.backbone.`, DDP under `module.`, the original's RuntimeM2D under `backbone.`.
WRAPPER_PREFIXES = ("module.ar.runtime.backbone.", "runtime.encoder.", "module.", "backbone.")
# Classifier heads, as each layout names them (after the wrappers are stripped) -> the canonical `classifier.*`:
# the original's fine-tuned files (EVAR: BatchNorm1d without affine + one Linear, `module.head.*`) and
# `fastm2d finetune` output (`Classifier`: `norm` + `head`).
HEAD_LAYOUTS = {
    "original": {"head.norm.running_mean": "norm.running_mean", "head.norm.running_var": "norm.running_var",
                 "head.mlp.mlp.0.weight": "head.weight", "head.mlp.mlp.0.bias": "head.bias"},
    "fastm2d": {"norm.running_mean": "norm.running_mean", "norm.running_var": "norm.running_var",
                "head.weight": "head.weight", "head.bias": "head.bias"},
}
PROJECTION_PREFIXES = ("audio_proj.", "text_proj.")  # M2D-CLAP: audio and text into one space
ENCODER_PREFIXES = ("norm_stats", "cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
EXTRA_PREFIXES = ("classifier.", *PROJECTION_PREFIXES)  # beside the encoder / M2D weights in some files


def strip_wrappers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove the prefixes that DDP and evaluation wrappers add (WRAPPER_PREFIXES), as the original runtime does."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def canonical_heads(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A classifier head under any known layout -> `classifier.norm.running_*`, `classifier.head.*` (BatchNorm's
    step counter dropped); other keys unchanged."""
    for layout in HEAD_LAYOUTS.values():
        if all(k in state for k in layout):
            out = {k: v for k, v in state.items() if k not in layout and not k.endswith("num_batches_tracked")}
            out.update({"classifier." + new: state[old] for old, new in layout.items()})
            return out
    return state


def parse_original_name(name: str) -> Tuple[list, list, int, str]:
    """'m2d_vit_base-80x608p16x16p32k-240413_enconly' -> ([80, 608], [16, 16], 32000, 'm2d_vit_base')."""
    parts = name.split("-")
    if len(parts) < 2:
        raise ValueError(f"{name!r} is not an original M2D folder name (<model>-<F>x<T>p<pF>x<pT>-<date>)")
    fields = parts[1].split("p")
    try:
        input_size = [int(a) for a in fields[0].split("x")]
        patch_size = [int(a) for a in fields[1].split("x")]
    except (ValueError, IndexError):
        raise ValueError(f"{name!r}: cannot read '<F>x<T>p<pF>x<pT>' from {parts[1]!r}") from None
    sr = 16000
    if len(fields) > 2 and re.fullmatch(r"\d+k", fields[2]):
        sr = int(fields[2][:-1]) * 1000
    if len(input_size) != 2 or len(patch_size) != 2:
        raise ValueError(f"{name!r}: sizes must be two numbers each")
    return input_size, patch_size, sr, parts[0]


def infer_model_config(state: Dict[str, torch.Tensor], path: Path) -> Tuple[ModelConfig, int]:
    """Sizes from the folder's name, else the file's own name (as the original runtime falls back), for input,
    patch and sample rate; widths and depths from the tensor shapes."""
    path = Path(path)
    try:
        input_size, patch_size, sr, model_name = parse_original_name(path.parent.name)
    except ValueError as folder_error:
        try:
            input_size, patch_size, sr, model_name = parse_original_name(path.stem)
        except ValueError:
            raise folder_error from None
    size = "large" if "large" in model_name else "base"
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    embed_dim = state["cls_token"].shape[-1]
    cfg = ModelConfig(size=size, embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // 64),
                      input_size=input_size, patch_size=patch_size)
    if "decoder_embed.weight" in state:
        cfg.decoder_embed_dim = state["decoder_embed.weight"].shape[0]
        cfg.decoder_depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        cfg.decoder_num_heads = 16  # the original's predictor always uses 16 heads
    if "offline_predictor.weight" in state:  # M2D-X: the task from the model's name, the width from the weights
        cfg.off_dim = state["offline_predictor.weight"].shape[0]
        cfg.off_loss = "bce" if model_name.startswith("m2d_as") else "norm_mse"
    elif "logit_scale" in state and "audio_proj.0.weight" in state:  # M2D-CLAP as trained (M2D_CLAP_ViT)
        cfg.off_loss = "clip"  # the caption width: text_proj's input, else (an identity) the encoder's own
        cfg.off_dim = state["text_proj.weight"].shape[1] if "text_proj.weight" in state else embed_dim
    return cfg.resolved(), sr


# --------------------------------------------------------------------------------------------- export -----
def original_folder_name(cfg: ModelConfig, sample_rate: int, date: str, model_name: Optional[str] = None) -> str:
    kind = "m2d" if not cfg.off_dim else {"bce": "m2d_as", "ce": "m2d_as", "clip": "m2d_clap"}.get(cfg.off_loss, "m2d_x")
    name = model_name or f"{kind}_vit_{cfg.size}"
    sr = "" if sample_rate == 16000 else f"p{sample_rate // 1000}k"
    return f"{name}-{cfg.input_size[0]}x{cfg.input_size[1]}p{cfg.patch_size[0]}x{cfg.patch_size[1]}{sr}-{date}"
