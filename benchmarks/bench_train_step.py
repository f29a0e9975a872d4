"""Training-step throughput of the reference trainer (pytest-benchmark).

    pytest benchmarks/bench_train_step.py --benchmark-columns=median,iqr,rounds

Prints samples/s from the median step time, with the device and versions. On CPU this is the baseline the
fast paths (kernels, compile, DeepSpeed) are compared with; on a GPU run it through the device suite.
"""
from __future__ import annotations

import platform

import pytest
import torch

from fastm2d.config import load_config
from fastm2d.train import Trainer

CASES = {
    # name: (config overrides, micro-batch)
    "demo": (["model.size=tiny", "model.decoder_embed_dim=128", "model.decoder_depth=2", "model.decoder_num_heads=4"], 32),
    "vit_base": (["model.size=base"], 8),
}


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}"


@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, case, tmp_path):
    overrides, batch = CASES[case]
    cfg = load_config(None, [f"out_dir={tmp_path}", *overrides, f"train.batch_size={batch}", "train.max_steps=1000",
                             "data.norm_stats=[-7.1,4.2]", "data.synthetic_clips=32", "train.progress=false",
                             "train.tensorboard=false"])
    trainer = Trainer(cfg)
    lms = torch.randn(batch, 1, 80, 608, device=trainer.device)

    def step():
        loss = trainer.train_step([lms])
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    step()  # warm-up: allocator, first-call dispatch
    benchmark.pedantic(step, rounds=5 if case == "vit_base" else 10, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(samples_per_s=batch / median, batch=batch, device=describe(trainer.device))
    print(f"\n{case}: batch {batch}, median {median * 1e3:.1f} ms/step = {batch / median:.1f} samples/s "
          f"on {describe(trainer.device)}")
