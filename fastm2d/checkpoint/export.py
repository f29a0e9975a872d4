"""Export to the original's layout (`<name>-<F>x<T>p<pF>x<pT>-<date>/checkpoint-<epoch>.pth`, what its runtime
reads) or to pickle-free safetensors with every setting as metadata."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError


def refuse_existing(path: Path) -> None:
    """An export never replaces a file silently (a second export into the same --out once did)."""
    if path.exists() or path.is_symlink():
        raise CheckpointError(f"{path} exists: an export never replaces a file; remove it or choose another --out")
from .files import atomic_save, save_safetensors
from .loading import read_checkpoint
from .original import ENCODER_PREFIXES, EXTRA_PREFIXES, HEAD_LAYOUTS, original_folder_name


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
    refuse_existing(out)
    extra = {k: obj[k] for k in ("classes", "multi_label") if isinstance(obj, dict) and k in obj}
    if fmt == "safetensors":
        save_safetensors(state, out, {"model_config": json.dumps(asdict(cfg)), "sample_rate": str(sr),
                                      "epoch": str(epoch), "format": "fastm2d-weights",
                                      **{k: json.dumps(v) for k, v in extra.items()}})
    else:  # every setting where loading reads it (the original reads only 'model' and the folder's name)
        atomic_save({"model": state, "epoch": epoch, "model_config": asdict(cfg), "sample_rate": sr, **extra,
                     "args": {"model_config": asdict(cfg), "sample_rate": sr}}, out)
    return out
