"""`fastm2d adapt AUDIO --from CHECKPOINT`: the small-data recipe (paper III-B, docs/spec.md "M2D-X") in one command.

Further pre-training on a few hundred to a few thousand private clips: start from released (or our) weights,
keep that model as a frozen offline teacher (regularisation), mix background noise when given, effective batch
128 reached by accumulation on a small GPU, the list repeated to 10,000 items per epoch, 600 epochs. Every value
can be overridden with key=value; the plan (items, steps, estimated time from a measured step) is printed first.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence

import torch

from ..checkpoint import read_checkpoint
from ..config import Config, load_config
from ..model import M2D
from ..devices import pick_device

log = logging.getLogger("fastm2d.adapt")

EFFECTIVE_BATCH = 128
EPOCH_ITEMS = 10000
EPOCHS = 600
NOISE_ETA = 0.3


def recipe_overrides(audio: str, checkpoint: str, noise: Optional[str], out_dir: str) -> List[str]:
    """The recipe as key=value overrides: the model's shape from the checkpoint, the rest from docs/spec.md."""
    _, cfg, sr, _ = read_checkpoint(checkpoint)
    out = [f"out_dir={out_dir}", f"data.train={audio}", f"train.init_from={checkpoint}", "offline.task=regularize",
           f"data.sample_rate={sr}", f"data.min_epoch_items={EPOCH_ITEMS}", f"train.epochs={EPOCHS}",
           f"model.size={cfg.size}", f"model.embed_dim={cfg.embed_dim}", f"model.depth={cfg.depth}",
           f"model.num_heads={cfg.num_heads}", f"model.input_size=[{cfg.input_size[0]},{cfg.input_size[1]}]",
           f"model.patch_size=[{cfg.patch_size[0]},{cfg.patch_size[1]}]",
           f"model.decoder_embed_dim={cfg.decoder_embed_dim}", f"model.decoder_depth={cfg.decoder_depth}",
           f"model.decoder_num_heads={cfg.decoder_num_heads}"]
    if noise:
        out += [f"data.noise.train={noise}", f"data.noise.eta={NOISE_ETA}"]
    return out


def largest_micro_batch(config: Config, device: torch.device, candidates: Sequence[int] = (128, 64, 32, 16, 8, 4, 2)) -> int:
    """The largest micro-batch that divides 128 and whose training step fits in this GPU's memory (tried with a
    real forward/backward on random input); on CPU 32 (memory there is not probed: running out kills the process)."""
    if device.type != "cuda":
        return 32

    model = M2D(config.model).to(device)
    try:
        for b in candidates:
            try:
                x = torch.randn(b, 1, *config.model.input_size, device=device)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model(x)["loss"].backward()
                torch.cuda.synchronize(device)
                return b
            except torch.cuda.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        return 1
    finally:
        del model
        torch.cuda.empty_cache()


def adapt_config(audio: str, checkpoint: str, noise: Optional[str], out_dir: str, overrides: Sequence[str]) -> Config:
    """The recipe, then the micro-batch chosen for this device, then the user's overrides (which win)."""
    base = recipe_overrides(audio, checkpoint, noise, out_dir)
    config = load_config(None, [*base, *overrides])
    user_keys = {o.split("=", 1)[0] for o in overrides}
    if not {"train.batch_size", "train.accum_steps"} & user_keys:
        micro = largest_micro_batch(config, pick_device(config.train.device, "train.device"))
        config = load_config(None, [*base, f"train.batch_size={micro}",
                                    f"train.accum_steps={max(1, EFFECTIVE_BATCH // micro)}", *overrides])
    return config


def describe_plan(trainer) -> str:
    t = trainer.config.train
    return (f"plan: {len(trainer.data.source)} usable clips, {trainer.data.sampler.epoch_items} items per epoch, "
            f"{trainer.total_steps} optimiser steps of {trainer.effective_batch} "
            f"({t.batch_size} x {t.accum_steps} accumulated x {trainer.dist.world_size} process(es)), "
            f"teacher and start: {t.init_from}" + (f", noise eta {trainer.data.eta}" if trainer.data.noise is not None else ""))
