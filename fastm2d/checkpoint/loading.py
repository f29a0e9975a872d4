"""From a path to weights in a model: which file a run folder or model folder means, reading any format into one
(state, model config, sample rate, object) tuple with every tensor checked, exact loading, `load_model` (the full
M2D) and `train.init_from` (as much of a model as a file holds)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..config import ConfigError, ModelConfig, model_config_from_dict, unseen_frames
from ..errors import CheckpointError
from ..model import DEFAULT_NORM_STATS, M2D
from ..run_folder import RunFolder
from .files import PRETRAINED_WEIGHTS, is_pretrained_folder, load_weights_file
from .original import ENCODER_PREFIXES, EXTRA_PREFIXES, canonical_heads, infer_model_config, strip_wrappers
from ..model.projections import attach_projections

log = logging.getLogger("fastm2d")
TEXT_ENCODER_PREFIX = "text_encoder."  # M2D-CLAP 2025 'TI' releases: the fine-tuned caption encoder in the file


def list_checkpoints(folder: Path) -> Dict[int, Path]:
    return RunFolder(folder).checkpoints()


def latest_checkpoint(folder: Path) -> Optional[Path]:
    return RunFolder(folder).latest_checkpoint()


def read_checkpoint(path: str | Path) -> Tuple[Dict[str, torch.Tensor], ModelConfig, int, dict]:
    """-> (state_dict without wrappers, model config, sample rate, the whole checkpoint object)."""
    path = resolve_checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    obj = load_weights_file(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "cls_token" not in strip_wrappers(state):
        raise CheckpointError(f"{path}: no M2D weights (expected a 'model' state dict with cls_token)")
    if any(k.startswith("backbone.") for k in state):
        # The original's RuntimeM2D / PortableM2D layout: its loader reads `backbone.*` (portable_m2d.get_backbone:
        # checkpoint['model'], then extract_weight(..., 'backbone.')) and, for a 2025 'TI' release, the text
        # encoder from the same file (get_text_encoder: weights['model'], extract_weight(..., 'text_encoder.')).
        # Both are kept; anything else is dropped, and said so.
        dropped = sorted(k for k in state if not k.startswith(("backbone.", TEXT_ENCODER_PREFIX)))
        if dropped:
            log.warning("%s: %d tensors beside backbone.* and text_encoder.* are not used: %s%s", path, len(dropped),
                        ", ".join(dropped[:6]), " ..." if len(dropped) > 6 else "")
        state = {k: v for k, v in state.items() if k.startswith(("backbone.", TEXT_ENCODER_PREFIX))}
    state = canonical_heads(strip_wrappers(state))
    if "model_config" in obj:
        if not isinstance(obj["model_config"], dict):
            raise CheckpointError(f"{path}: model_config is a {type(obj['model_config']).__name__}, not a mapping")
        try:  # sizes are checked against the limits before anything is built
            cfg = model_config_from_dict(obj["model_config"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        sr = obj.get("sample_rate", 16000)
        if type(sr) is not int or sr not in (16000, 32000):
            raise CheckpointError(f"{path}: sample_rate={sr!r}: expected 16000 or 32000")
    else:
        try:
            cfg, sr = infer_model_config(state, path)
        except ConfigError as e:
            raise CheckpointError(f"{path}: {e}") from None
        except ValueError as e:
            raise CheckpointError(f"{path}: original checkpoint, but {e}") from None
    check_tensors(state, path)
    check_metadata(obj, path)
    if unseen_frames(cfg):
        log.info("%s: %s", path, unseen_frames(cfg))
    return state, cfg, sr, obj


MAX_CLASSES = 100_000


def check_metadata(obj: dict, path) -> None:
    """The fields beside the weights that commands read, each of its one type and range, checked here once for
    every format (a .pth, safetensors metadata, a model folder's config.json): an epoch that is a non-negative
    integer, class names that are a list of strings, multi_label a real boolean (the string "false" is not)."""
    if not isinstance(obj, dict):
        return
    epoch = obj.get("epoch", 0)
    if type(epoch) is not int or epoch < 0:
        raise CheckpointError(f"{path}: epoch={epoch!r}: expected a non-negative integer")
    if "classes" in obj and obj["classes"] is not None:
        classes = obj["classes"]
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c.strip() for c in classes):
            raise CheckpointError(f"{path}: classes must be a list of class names (non-empty strings), got "
                                  f"{str(classes)[:80]!r}")
        if len(classes) > MAX_CLASSES:
            raise CheckpointError(f"{path}: {len(classes)} classes, more than {MAX_CLASSES}")
    if "multi_label" in obj and type(obj["multi_label"]) is not bool:
        raise CheckpointError(f"{path}: multi_label={obj['multi_label']!r}: expected true or false (a boolean, not "
                              f"a {type(obj['multi_label']).__name__})")


def check_tensors(state: Dict[str, torch.Tensor], path) -> None:
    """Every entry a tensor, every float tensor finite: NaN weights would give NaN features (a probe at chance)."""
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {k} is a {type(v).__name__}, not a tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path}: {k} holds NaN or infinite values (a diverged run?); use an earlier "
                                  f"checkpoint")


def resolve_checkpoint_file(path: str | Path) -> Path:
    """A run folder -> its latest checkpoint-<N>.pth (else its newest .safetensors); a file stays as it is."""
    path = Path(path)
    if not path.is_dir():
        return path
    if is_pretrained_folder(path):  # save_pretrained's layout
        return path / PRETRAINED_WEIGHTS
    found = latest_checkpoint(path)
    if found is None:
        tensors = sorted(path.glob("checkpoint-*.safetensors"), key=lambda p: p.stat().st_mtime)
        found = tensors[-1] if tensors else None
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint-<N>.pth (or .safetensors) in this folder")
    return found


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
    own = model.state_dict()  # an M2D-CLAP model trains its projections: they are its own weights
    load_weights(model, {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIXES) or k in own}, path)
    model.sample_rate = sr
    if cfg.off_loss != "clip":
        attach_projections(model, state, path)  # M2D-CLAP inference files: audio_proj / text_proj kept with it
    return model


def init_from_weights(model: M2D, path: str | Path) -> str:
    """train.init_from: the online encoder (and the predictor, target and offline mapper when the file has them
    at the same shapes) from any checkpoint `load_model` / `load_encoder` reads; without a target, the target
    starts as a copy of the online encoder. The run keeps its own norm_stats, position tables and optimiser.
    Returns a one-line summary of what was loaded."""
    state, cfg, _, _ = read_checkpoint(path)
    own = model.state_dict()
    encoder = [k for k in own if k.startswith(ENCODER_PREFIXES) and k not in ("norm_stats", "pos_embed")]
    missing = [k for k in encoder if k not in state]
    if missing:
        raise CheckpointError(f"{path}: no encoder weights for {missing[:4]} (is it an M2D checkpoint?)")
    for k in encoder:
        if state[k].shape != own[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(state[k].shape)}, this model needs "
                                  f"{tuple(own[k].shape)} (model.size / patch_size differ from the checkpoint's)")
    new = {k: state[k] for k in encoder}
    loaded = ["encoder"]
    for group in ("decoder_", "mask_token", "target_", "offline_predictor.", "audio_proj.", "text_proj.",
                  "logit_scale"):
        keys = [k for k in own if k.startswith(group) and k != "decoder_pos_embed"]
        if keys and all(k in state and state[k].shape == own[k].shape for k in keys):
            new.update({k: state[k] for k in keys})
            loaded.append(group.rstrip("_."))
    if "target" not in loaded:  # the target starts where the online encoder starts
        new.update({"target_" + k: v for k, v in new.items() if k.startswith(("blocks.", "norm."))})
        loaded.append("target (copied from the encoder)")
    model.load_state_dict(new, strict=False)
    return ", ".join(loaded)
