"""Reading and writing checkpoint files safely: atomic writes (a crash never leaves a torn file), unpickling that
can never run code (`safe_load`, the one place a pickle is read), zip-bomb and DeepSpeed partition checks,
safetensors, and fastm2d's model folder (config.json + model.safetensors, written by pretrained.py)."""
from __future__ import annotations

import argparse
import json
import pathlib
import pickle
import re
from pathlib import Path
from typing import Dict, Optional

import torch

from ..atomic import atomic_file
from ..errors import CheckpointError
from ..frontend import first_line

# Everything a real checkpoint's pickle may reference beyond tensors and plain containers: the original's
# `args` is an argparse.Namespace (its values sometimes paths). Nothing here can run code when unpickled.
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                pathlib.PureWindowsPath]
# --------------------------------------------------------------------------------------------- reading ----
# save_pretrained's folder (pretrained.py writes it): JSON + safetensors, nothing that runs code
PRETRAINED_CONFIG, PRETRAINED_WEIGHTS, PRETRAINED_FORMAT = "config.json", "model.safetensors", "fastm2d-pretrained"
MAX_INFLATION = 10  # torch.save stores zip members uncompressed; a member inflating more was crafted


# --------------------------------------------------------------------------------------------- saving -----
def atomic_save(obj, path: Path) -> None:
    """torch.save through `atomic.atomic_file`: a crash or a full disk never leaves a torn file, and a link at
    `path` is refused, never written through."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def save_safetensors(state: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Weights only, no pickle at all: the format to publish weights in. Atomic like `atomic_save` (serialised
    in memory, then written: safetensors' own file writer would fail a full disk with its own error type)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in state.items()}, metadata=metadata)
    with atomic_file(path) as f:
        f.write(data)


def is_pretrained_folder(path: Path) -> bool:
    return (path / PRETRAINED_CONFIG).is_file() and (path / PRETRAINED_WEIGHTS).is_file()


def read_pretrained_config(path: Path, weights_pair: Optional[str] = None) -> dict:
    """config.json beside a model.safetensors -> the fields a checkpoint object carries; `weights_pair`: the id
    the weights file was saved with, which the config must carry too (else the two come from different saves)."""
    try:
        config = json.loads((path.parent / PRETRAINED_CONFIG).read_text())
    except RecursionError:
        raise CheckpointError(f"{path.parent / PRETRAINED_CONFIG}: unreadable (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.parent / PRETRAINED_CONFIG}: unreadable ({e})") from None
    if not isinstance(config, dict) or config.get("format") != PRETRAINED_FORMAT:
        raise CheckpointError(f"{path.parent / PRETRAINED_CONFIG}: not a fastm2d model folder (format "
                              f"{config.get('format') if isinstance(config, dict) else config!r})")
    if weights_pair is not None and config.get("pair") != weights_pair:
        raise CheckpointError(f"{path.parent}: {PRETRAINED_CONFIG} and {PRETRAINED_WEIGHTS} come from two different "
                              f"saves (one was interrupted between the two files); save the model again")
    return {k: config[k] for k in ("model_config", "sample_rate", "classes", "multi_label") if k in config}


def check_zip_members(path: Path) -> None:
    """Refuse a zip checkpoint whose compressed members would inflate far beyond the file's size (a zip bomb)
    before torch.load decompresses anything."""
    import zipfile
    try:
        if not zipfile.is_zipfile(path):
            return  # legacy pickle format or not a checkpoint: torch.load's own checks apply
        with zipfile.ZipFile(path) as z:
            stored = 0
            for info in z.infolist():
                if info.compress_type != zipfile.ZIP_STORED and \
                        info.file_size > MAX_INFLATION * max(info.compress_size, 1) + 2**20:
                    raise CheckpointError(f"{path}: refused to load: member {info.filename} inflates "
                                          f"{info.file_size / max(info.compress_size, 1):.0f}x to "
                                          f"{info.file_size / 2**20:.0f} MiB (PyTorch never compresses checkpoints)")
                stored += info.file_size if info.compress_type == zipfile.ZIP_STORED else 0
            size = path.stat().st_size
            if stored > size + 2**20:  # stored members each hold their own bytes: more than the file means overlap
                raise CheckpointError(f"{path}: refused to load: its stored members claim {stored / 2**20:.0f} MiB "
                                      f"in a {size / 2**20:.1f} MiB file (records that overlap: a zip bomb)")
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
            obj.update(read_pretrained_config(path, meta.get("pair")))
        try:
            if "model_config" in meta:
                obj["model_config"] = json.loads(meta["model_config"])
            for key in ("sample_rate", "epoch"):
                if key in meta:
                    obj[key] = int(meta[key])
            for key in ("classes", "multi_label"):
                if key in meta:
                    obj[key] = json.loads(meta[key])
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors metadata ({first_line(e) or 'nested too deeply'})") \
                from None
        return obj
    return safe_load(path)
