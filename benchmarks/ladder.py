"""The training-step ladder: each rung adds one speed feature, so every gain is attributed.

eager fp32 (explicit-softmax attention, reference kernels) -> +bf16 -> +fused attention (each backend) ->
+torch.compile -> +Triton kernels -> +CUDA graphs (compile mode reduce-overhead). Each rung reports samples/s,
MFU (against the stated peak), peak memory and compile time (the first step, reported apart).
"""
from __future__ import annotations

import tempfile
import time

import torch

from fastm2d.config import load_config
from fastm2d.train import Trainer

BASE = ["model.attention=reference", "model.kernels=reference", "train.precision=fp32"]
RUNGS = [
    ("eager fp32", []),
    ("+bf16", ["train.precision=bf16"]),
    ("+fused attention (sdpa)", ["train.precision=bf16", "model.attention=sdpa"]),
    ("+fused attention (xformers)", ["train.precision=bf16", "model.attention=xformers"]),
    ("+compile", ["train.precision=bf16", "model.attention=sdpa", "train.compile=true"]),
    ("+Triton kernels", ["train.precision=bf16", "model.attention=sdpa", "train.compile=true", "model.kernels=triton"]),
    ("+CUDA graphs", ["train.precision=bf16", "model.attention=sdpa", "train.compile=true", "model.kernels=triton",
                      "train.compile_mode=reduce-overhead"]),
]
# This CPU has no bf16 arithmetic (autocast bf16 measured 12x slower here), so its ladder stays in fp32.
CPU_RUNGS = [
    ("eager fp32", []),
    ("fp32 +fused attention (sdpa)", ["model.attention=sdpa"]),
    ("fp32 +sdpa +compile", ["model.attention=sdpa", "train.compile=true"]),
]
MODELS = {
    "vit_base": ["model.size=base"],
    "demo": ["model.size=tiny", "model.decoder_embed_dim=128", "model.decoder_depth=2", "model.decoder_num_heads=4"],
}


def measure_rung(name: str, overrides: list, model: str, batch: int, steps: int = 5) -> dict:
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"out_dir={tmp}", *MODELS[model], *BASE, *overrides, f"train.batch_size={batch}",
                                 "data.norm_stats=[-7.1,4.2]", "data.synthetic_clips=32", "train.max_steps=1000",
                                 "train.progress=false", "train.tensorboard=false"])
        try:
            trainer = Trainer(cfg)
        except Exception as e:  # a rung that cannot run here (no xformers, no CUDA) is a row with the reason
            return {"rung": name, "note": f"skipped: {str(e).splitlines()[0][:160]}"}
        lms = torch.randn(batch, 1, 80, 608, device=trainer.device)
        t0 = trainer.sync_time()
        trainer.train_step([lms])  # compilation / autotuning happen here
        first = trainer.sync_time() - t0
        trainer.train_step([lms])
        t0 = trainer.sync_time()
        for _ in range(steps):
            trainer.train_step([lms])
        sec = (trainer.sync_time() - t0) / steps
        rate = batch / sec
        row = {"rung": name, "batch": batch, "ms": sec * 1e3, "samples_s": rate, "first_step_s": first,
               "mfu": rate * trainer.flops_per_sample / trainer.peak_flops if trainer.peak_flops else None,
               "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None}
        del trainer
        return row


def ladder(model: str, batch: int, rungs=RUNGS, steps: int = 5, stop=lambda: False) -> list:
    rows = []
    base_rate = None
    for name, overrides in rungs:
        if stop():
            rows.append({"rung": name, "note": "skipped: time budget"})
            continue
        t0 = time.perf_counter()
        row = measure_rung(name, overrides, model, batch, steps)
        row["wall_s"] = time.perf_counter() - t0
        if "samples_s" in row:
            base_rate = base_rate or row["samples_s"]
            row["x_vs_eager"] = row["samples_s"] / base_rate
        rows.append(row)
    return rows
