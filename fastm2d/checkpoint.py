"""Checkpoints: atomic saving, fastm2d and original M2D formats, `load_model`, export to the original layout.

A fastm2d checkpoint is a superset of the original one: {'model': state_dict with the original key names,
'optimizer', 'epoch', 'scaler', 'args'} plus 'model_config', 'config', 'step', 'rng', 'fastm2d_version'.
Original checkpoints carry their configuration in the parent folder's name
(`<model>-<F>x<T>p<pF>x<pT>[p<sr>]...-<YYMMDD>...`), which `parse_original_name` reads as the original does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import pickle
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .config import ConfigError, ModelConfig, model_config_from_dict, unseen_frames
from .errors import CheckpointError  # noqa: F401  (re-exported)
from .frontend import first_line
from .model import DEFAULT_NORM_STATS, M2D
from .run_folder import RunFolder

log = logging.getLogger("fastm2d")
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
# Everything a real checkpoint's pickle may reference beyond tensors and plain containers: the original's
# `args` is an argparse.Namespace (its values sometimes paths). Nothing here can run code when unpickled.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                pathlib.PureWindowsPath]
ENCODER_PREFIXES = ("norm_stats", "cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
EXTRA_PREFIXES = ("classifier.", *PROJECTION_PREFIXES)  # beside the encoder / M2D weights in some files


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = e
        while cause is not None and not isinstance(cause, OSError):  # torch.save wraps a full disk's OSError
            cause = cause.__context__                                   # in a RuntimeError from its zip writer
        if cause is not None and cause is not e:
            raise cause from None
        raise


def save_safetensors(state: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Weights only, no pickle at all: the format to publish weights in. Atomic like `atomic_save`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def list_checkpoints(folder: Path) -> Dict[int, Path]:
    return RunFolder(folder).checkpoints()


def latest_checkpoint(folder: Path) -> Optional[Path]:
    return RunFolder(folder).latest_checkpoint()


# --------------------------------------------------------------------------------------------- reading ----
# save_pretrained's folder (pretrained.py writes it): JSON + safetensors, nothing that runs code
PRETRAINED_CONFIG, PRETRAINED_WEIGHTS, PRETRAINED_FORMAT = "config.json", "model.safetensors", "fastm2d-pretrained"


def is_pretrained_folder(path: Path) -> bool:
    return (path / PRETRAINED_CONFIG).is_file() and (path / PRETRAINED_WEIGHTS).is_file()


def read_pretrained_config(path: Path) -> dict:
    """config.json beside a model.safetensors -> the fields a checkpoint object carries."""
    try:
        config = json.loads((path.parent / PRETRAINED_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.parent / PRETRAINED_CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"{path.parent / PRETRAINED_CONFIG}: not a fastm2d model folder (format "
                              f"{config.get('format') if isinstance(config, dict) else config!r})")
    return {k: config[k] for k in ("model_config", "sample_rate", "classes", "multi_label") if k in config}


MAX_INFLATION = 10  # torch.save stores zip members uncompressed; a member inflating more was crafted


def check_zip_members(path: Path) -> None:
    """Refuse a zip checkpoint whose compressed members would inflate far beyond the file's size (a zip bomb)
    before torch.load decompresses anything."""
    import zipfile
    try:
        if not zipfile.is_zipfile(path):
            return  # legacy pickle format or not a checkpoint: torch.load's own checks apply
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED and \
                        info.file_size > MAX_INFLATION * max(info.compress_size, 1) + 2**20:
                    raise CheckpointError(f"{path}: refused to load: member {info.filename} inflates "
                                          f"{info.file_size / max(info.compress_size, 1):.0f}x to "
                                          f"{info.file_size / 2**20:.0f} MiB (PyTorch never compresses checkpoints)")
    except (OSError, zipfile.BadZipFile):
        return  # unreadable: torch.load reports it


def deepspeed_safe_globals() -> list:
    """The plain-data classes DeepSpeed pickles into its ZeRO checkpoint files (loss scaler, tensor fragment
    addresses, the stage enum): rebuilt from their fields, never called with arguments from the file."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_checkpoint(folder: Path) -> None:
    """Every file DeepSpeed would unpickle from `folder` (it loads them allowing any pickle) is first read with
    `safe_load`: a planted pickle is refused here, before DeepSpeed can run it."""
    for f in sorted(Path(folder).glob("*.pt")):
        safe_load(f, deepspeed_safe_globals())


def safe_load(path: str | Path, extra_globals: Optional[list] = None):
    """torch.load that can never run code: tensors, numbers, strings, containers and SAFE_GLOBALS only.

    Released weights come from the internet, and a run folder is writable by whoever shares it; a pickle can
    name any callable (os.system ...). Anything outside the allow-list (plus `extra_globals`: DeepSpeed's data
    classes for its own files) is refused with a CheckpointError naming the file and the offending type.
    Every file fastm2d unpickles goes through here (tests/test_safe_loading.py scans the tree for others).
    """
    path = Path(path)
    check_zip_members(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS + list(extra_globals or [])):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r"GLOBAL ([\w.]+)", str(e))
        if not found:
            raise CheckpointError(f"{path}: unreadable checkpoint (not a PyTorch file, or truncated)") from None
        raise CheckpointError(f"{path}: refused to load: its pickle references {found[0]}, which is not a tensor, "
                              f"number or container and could run code; only load files from sources you trust "
                              f"(or ask for a .safetensors copy)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(e)}); truncated or not a PyTorch "
                              f"file?") from None


def load_weights_file(path: Path):
    """-> the checkpoint object: a dict from a .pth (safely unpickled) or {'model': ..., metadata} from a
    .safetensors file."""
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({first_line(e)})") from None
        obj = {"model": state}
        if path.name == PRETRAINED_WEIGHTS and (path.parent / PRETRAINED_CONFIG).is_file():
            obj.update(read_pretrained_config(path))
        try:
            if "model_config" in meta:
                obj["model_config"] = json.loads(meta["model_config"])
            for key in ("sample_rate", "epoch"):
                if key in meta:
                    obj[key] = int(meta[key])
            for key in ("classes", "multi_label"):
                if key in meta:
                    obj[key] = json.loads(meta[key])
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors metadata ({first_line(e)})") from None
        return obj
    return safe_load(path)


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


def read_checkpoint(path: str | Path) -> Tuple[Dict[str, torch.Tensor], ModelConfig, int, dict]:
    """-> (state_dict without wrappers, model config, sample rate, the whole checkpoint object)."""
    path = resolve_checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    obj = load_weights_file(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "cls_token" not in strip_wrappers(state):
        raise CheckpointError(f"{path}: no M2D weights (expected a 'model' state dict with cls_token)")
    if any(k.startswith("backbone.") for k in state):  # the original's RuntimeM2D: keep only its backbone
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
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
    if unseen_frames(cfg):
        log.info("%s: %s", path, unseen_frames(cfg))
    return state, cfg, sr, obj


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
        from .model.projections import attach_projections
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


# --------------------------------------------------------------------------------------------- export -----
def original_folder_name(cfg: ModelConfig, sample_rate: int, date: str, model_name: Optional[str] = None) -> str:
    kind = "m2d" if not cfg.off_dim else {"bce": "m2d_as", "ce": "m2d_as", "clip": "m2d_clap"}.get(cfg.off_loss, "m2d_x")
    name = model_name or f"{kind}_vit_{cfg.size}"
    sr = "" if sample_rate == 16000 else f"p{sample_rate // 1000}k"
    return f"{name}-{cfg.input_size[0]}x{cfg.input_size[1]}p{cfg.patch_size[0]}x{cfg.patch_size[1]}{sr}-{date}"


def export_original(path: str | Path, out_root: str | Path, encoder_only: bool = False,
                    date: Optional[str] = None, fmt: str = "pth") -> Path:
    """Write `<out_root>/<name>-<F>x<T>p<pF>x<pT>-<date>/checkpoint-<epoch>.pth` = {'model': ...} as the original,
    or `.safetensors` (weights plus the model config and sample rate as metadata; no pickle)."""
    import time

    if fmt not in ("pth", "safetensors"):
        raise CheckpointError(f"export format {fmt!r}: expected pth or safetensors")
    state, cfg, sr, obj = read_checkpoint(path)
    if encoder_only:  # a classifier head and M2D-CLAP projections stay: they are useless without their encoder
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES + EXTRA_PREFIXES)}
    # The head under the original's names (portable_m2d reads `module.head.*`), everything else as loaded.
    names = {"classifier." + new: old for old, new in HEAD_LAYOUTS["original"].items()}
    state = {("module." + names[k] if k in names else k): v for k, v in state.items()}
    folder = Path(out_root) / (original_folder_name(cfg, sr, date or time.strftime("%y%m%d"))
                               + ("_enconly" if encoder_only else ""))
    epoch = int(obj.get("epoch", 0)) if isinstance(obj, dict) else 0
    out = folder / f"checkpoint-{epoch}.{fmt}"
    extra = {k: obj[k] for k in ("classes", "multi_label") if isinstance(obj, dict) and k in obj}
    if fmt == "safetensors":
        save_safetensors(state, out, {"model_config": json.dumps(asdict(cfg)), "sample_rate": str(sr),
                                      "epoch": str(epoch), "format": "fastm2d-weights",
                                      **{k: json.dumps(v) for k, v in extra.items()}})
    else:  # every setting where loading reads it (the original reads only 'model' and the folder's name)
        atomic_save({"model": state, "epoch": epoch, "model_config": asdict(cfg), "sample_rate": sr, **extra,
                     "args": {"model_config": asdict(cfg), "sample_rate": sr}}, out)
    return out
