"""A model folder the Hugging Face ecosystem knows: `config.json` + `model.safetensors`.

  save_pretrained(weights, folder)   any weights fastm2d reads (a run, a checkpoint, an original release, a
                                     fine-tuned file) -> folder/config.json (model config, sample rate, front-end
                                     settings, normalisation statistics, class names) + folder/model.safetensors
  from_pretrained(folder)            -> a Runtime (load_classifier(folder) gives the Tagger, load_model(folder) the
                                     full M2D when the folder holds one)

JSON and safetensors only: loading a folder never unpickles anything and never runs code from it. The layout is
huggingface_hub's (`huggingface_hub.upload_folder` publishes it as it is); no network is used here.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..checkpoint import PRETRAINED_CONFIG as CONFIG, PRETRAINED_FORMAT as FORMAT, PRETRAINED_WEIGHTS as WEIGHTS
from ..checkpoint import is_pretrained_folder, read_checkpoint, save_safetensors
from ..atomic import DISK_FULL, write_atomic
from ..errors import CheckpointError, CheckpointWriteError
from ..frontend import FRONTEND_PARAMS, N_MELS
from .runtime import load_encoder


def save_pretrained(weights, folder: str | Path) -> Path:

    state, cfg, sr, obj = read_checkpoint(weights)
    folder = Path(folder)
    norm = state.get("norm_stats")
    config = {"format": FORMAT, "fastm2d_version": __version__, "model_config": asdict(cfg), "sample_rate": sr,
              "frontend": {"n_mels": N_MELS, **FRONTEND_PARAMS[sr]},
              "norm_stats": norm.tolist() if norm is not None else None}
    for key in ("classes", "multi_label"):
        if isinstance(obj, dict) and key in obj:
            config[key] = obj[key]
    # Both files are written atomically, weights first; one id in both tells a reader whether they belong
    # together (a save killed between the two leaves new weights beside the old config: refused, not mixed).
    config["pair"] = uuid.uuid4().hex
    try:
        save_safetensors(state, folder / WEIGHTS, {"format": FORMAT, "pair": config["pair"]})
        write_atomic(folder / CONFIG, json.dumps(config, indent=1) + "\n")
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise CheckpointWriteError(f"{folder}: cannot write the model folder ({e.strerror or e}): free space and "
                                   f"save again; what was there is kept (each file is replaced whole or not at "
                                   f"all, and a half-saved pair is refused when read)") from None
    return folder


def from_pretrained(folder: str | Path, device="cpu"):
    if not is_pretrained_folder(Path(folder)):
        raise CheckpointError(f"{folder}: expected {CONFIG} and {WEIGHTS} (written by fastm2d.save_pretrained)")
    return load_encoder(folder, device=device)
