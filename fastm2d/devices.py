"""Which device a command runs on and in which arithmetic: one choice for training and for using a model.

Precision `auto` is bf16 autocast where the hardware does bf16 fast, else fp32:
- CUDA: bf16 when the card supports it.
- CPU: measured once per process, a bf16 against an fp32 matrix product. CPUs with bf16 units (AVX512-BF16, AMX)
  run bf16 about twice as fast (measured on this project's AMD EPYC: 409 against 180 GFLOP/s at 2048x2048);
  others emulate it, several times slower (12x on an earlier machine), so no fixed rule serves both.
The environment variable FASTM2D_PRECISION=fp32|bf16 replaces that choice wherever `auto` applies (every command,
the interfaces); an explicit setting (train.precision) wins over both. Weights stay fp32 either way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Optional

import torch

from .config import PRECISION_CHOICES
from .errors import ConfigError

log = logging.getLogger("fastm2d")

ENV_VAR = "FASTM2D_PRECISION"
BF16_FAST_ENOUGH = 1.3  # bf16 must beat fp32 by this factor (beyond timing noise) to be chosen on a CPU
_cpu_speedup: Optional[float] = None


def pick_device(name: str, key: str = "--device") -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; `key` names the setting in the error (train.device, --device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but CUDA is not available here")
    return device


def cpu_bf16_speedup(size: int = 1024, repeats: int = 3) -> float:
    """fp32 time / bf16 time of a size x size matrix product on this CPU (best of `repeats`), once per process."""
    global _cpu_speedup
    if _cpu_speedup is None:
        a32, b32 = torch.randn(size, size), torch.randn(size, size)
        a16, b16 = a32.bfloat16(), b32.bfloat16()

        def best(a, b) -> float:
            torch.mm(a, b)  # warm-up (thread pool, packing buffers)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                torch.mm(a, b)
                times.append(time.perf_counter() - t0)
            return min(times)

        _cpu_speedup = best(a32, b32) / best(a16, b16)
        log.info("CPU bf16 matrix products run %.2fx fp32's speed here: precision auto means %s on this CPU "
                 "(%s=fp32|bf16 overrides)", _cpu_speedup, "bf16" if _cpu_speedup >= BF16_FAST_ENOUGH else "fp32",
                 ENV_VAR)
    return _cpu_speedup


def autocast_dtype(device: torch.device, setting: str = "auto", key: str = "precision") -> Optional[torch.dtype]:
    """The autocast dtype for `device`, or None for fp32. `setting`: auto | fp32 | bf16 | fp16; `key` names it in
    errors (train.precision)."""
    if setting == "auto":
        setting, key = os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR
    if setting not in PRECISION_CHOICES:
        raise ConfigError(f"{key}={setting!r}: expected one of {PRECISION_CHOICES}")
    if setting == "auto":
        if device.type == "cuda":
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            setting = "bf16" if device.type == "cpu" and cpu_bf16_speedup() >= BF16_FAST_ENOUGH else "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(f"{key}=fp16 needs CUDA (loss scaling); use fp32 or bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def autocast(device: torch.device | str, setting: str = "auto"):
    """The context a model runs under on `device`: autocast in the chosen dtype, or nothing for fp32."""
    device = torch.device(device)
    dtype = autocast_dtype(device, setting)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
