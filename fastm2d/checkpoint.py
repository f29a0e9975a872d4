"""Checkpoints: atomic saving, fastm2d and original M2D formats, `load_model`, export to the original layout.

A fastm2d checkpoint is a superset of the original one: {'model': state_dict with the original key names,
'optimizer', 'epoch', 'scaler', 'args'} plus 'model_config', 'config', 'step', 'rng', 'fastm2d_version'.
Original checkpoints carry their configuration in the parent folder's name
(`<model>-<F>x<T>p<pF>x<pT>[p<sr>]...-<YYMMDD>...`), which `parse_original_name` reads as the original does.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .config import ModelConfig, model_config_from_dict
from .model import DEFAULT_NORM_STATS, M2D

CKPT_RE = re.compile(r"checkpoint-(\d+)\.pth$")
WRAPPER_PREFIXES = ("module.", "backbone.")
ENCODER_PREFIXES = ("norm_stats", "cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message names the file."""


# --------------------------------------------------------------------------------------------- saving -----
def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_checkpoints(folder: Path) -> Dict[int, Path]:
    return {int(m.group(1)): p for p in Path(folder).glob("checkpoint-*.pth") if (m := CKPT_RE.search(p.name))}


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = list_checkpoints(folder)
    return found[max(found)] if found else None


# --------------------------------------------------------------------------------------------- reading ----
def strip_wrappers(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove `module.` / `backbone.` prefixes that DDP or evaluation wrappers add."""
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


def infer_model_config(state: Dict[str, torch.Tensor], folder_name: str) -> Tuple[ModelConfig, int]:
    """Sizes from the folder name (input, patch, sample rate) and from tensor shapes (widths, depths)."""
    input_size, patch_size, sr, model_name = parse_original_name(folder_name)
    size = "large" if "large" in model_name else "base"
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    embed_dim = state["cls_token"].shape[-1]
    cfg = ModelConfig(size=size, embed_dim=embed_dim, depth=depth, num_heads=max(1, embed_dim // 64),
                      input_size=input_size, patch_size=patch_size)
    if "decoder_embed.weight" in state:
        cfg.decoder_embed_dim = state["decoder_embed.weight"].shape[0]
        cfg.decoder_depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks."))
        cfg.decoder_num_heads = 16  # the original's predictor always uses 16 heads
    return cfg.resolved(), sr


def read_checkpoint(path: str | Path) -> Tuple[Dict[str, torch.Tensor], ModelConfig, int, dict]:
    """-> (state_dict without wrappers, model config, sample rate, the whole checkpoint object)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint-<N>.pth in this folder")
        path = found
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "cls_token" not in strip_wrappers(state):
        raise CheckpointError(f"{path}: no M2D weights (expected a 'model' state dict with cls_token)")
    state = strip_wrappers(state)
    if "model_config" in obj:
        cfg = model_config_from_dict(obj["model_config"])
        sr = int(obj.get("sample_rate", 16000))
    else:
        try:
            cfg, sr = infer_model_config(state, path.parent.name)
        except ValueError as e:
            raise CheckpointError(f"{path}: original checkpoint, but {e}") from None
    return state, cfg, sr, obj


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], path) -> None:
    """Load with exact key and shape checking, naming the file; missing norm_stats -> the AudioSet values."""
    state = dict(state)
    if "norm_stats" not in state:
        state["norm_stats"] = torch.tensor(DEFAULT_NORM_STATS)  # original weights before 2023 have none
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k in own:
        if state[k].shape != own[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}, model needs {tuple(own[k].shape)}")
    model.load_state_dict(state)


def load_model(path: str | Path, kernels: Optional[str] = None, attention: Optional[str] = None) -> M2D:
    """The full M2D (online, predictor, target) from a fastm2d checkpoint or run folder, or an original one."""
    state, cfg, sr, _ = read_checkpoint(path)
    if "target_blocks.0.norm1.weight" not in state:
        raise CheckpointError(f"{path}: encoder-only weights; use fastm2d.load_encoder for these")
    cfg.kernels = kernels or cfg.kernels
    cfg.attention = attention or cfg.attention
    model = M2D(cfg)
    load_weights(model, state, path)
    model.sample_rate = sr
    return model


# --------------------------------------------------------------------------------------------- export -----
def original_folder_name(cfg: ModelConfig, sample_rate: int, date: str, model_name: Optional[str] = None) -> str:
    name = model_name or f"m2d_vit_{cfg.size}"
    sr = "" if sample_rate == 16000 else f"p{sample_rate // 1000}k"
    return f"{name}-{cfg.input_size[0]}x{cfg.input_size[1]}p{cfg.patch_size[0]}x{cfg.patch_size[1]}{sr}-{date}"


def export_original(path: str | Path, out_root: str | Path, encoder_only: bool = False,
                    date: Optional[str] = None) -> Path:
    """Write `<out_root>/<name>-<F>x<T>p<pF>x<pT>-<date>/checkpoint-<epoch>.pth` = {'model': ...} as the original."""
    import time

    state, cfg, sr, obj = read_checkpoint(path)
    if encoder_only:
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    folder = Path(out_root) / (original_folder_name(cfg, sr, date or time.strftime("%y%m%d"))
                               + ("_enconly" if encoder_only else ""))
    epoch = int(obj.get("epoch", 0)) if isinstance(obj, dict) else 0
    out = folder / f"checkpoint-{epoch}.pth"
    atomic_save({"model": state, "epoch": epoch, "args": {"model_config": asdict(cfg), "sample_rate": sr}}, out)
    return out
