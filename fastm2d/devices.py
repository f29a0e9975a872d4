"""Which device a command runs on and in which arithmetic: one choice for training and for using a model.

Precision `auto` is bf16 autocast where the hardware does bf16 fast, else fp32:
- CUDA: bf16 when the card supports it.
- CPU: what the CPU reports first. x86 CPUs with bf16 units (AVX512-BF16, AMX) run bf16 about twice as fast
  (an AMD EPYC with AVX512-BF16: 409 against 180 GFLOP/s at 2048x2048); x86 CPUs without them emulate it, hundreds
  of times slower (this project's AVX2-only EPYC: 0.3 against 180 GFLOP/s), so torch's own report of the CPU's
  features decides with no timing. Only where nothing is reported (an ARM CPU without a bf16 flag we can read, an
  unknown architecture) is a small product timed, capped at about a second, and the answer kept in the user cache
  per machine (CPU model, features, torch version), so it is paid once per machine, not per command.
- Several processes take rank 0's choice (one collective), so ranks never train in different arithmetic.
The environment variable FASTM2D_PRECISION=fp32|bf16 replaces that choice wherever `auto` applies (every command,
the interfaces); an explicit setting (train.precision) wins over both. Weights stay fp32 either way.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from typing import Callable, Optional, TypeVar

import torch

from .atomic import write_atomic
from .config import PRECISION_CHOICES
from .errors import ConfigError
from .user_cache import user_cache

log = logging.getLogger("fastm2d")

ENV_VAR = "FASTM2D_PRECISION"
BF16_FAST_ENOUGH = 1.3  # bf16 must beat fp32 by this factor (beyond timing noise) to be chosen on a CPU
_cpu_choice: Optional[str] = None  # "bf16" | "fp32", once per process
T = TypeVar("T")


def pick_device(name: str, key: str = "--device") -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; `key` names the setting in the error (train.device, --device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but CUDA is not available here")
    return device


def decided_by_rank_zero(decide: Callable[[], T]) -> T:
    """decide() on rank 0, its answer on every rank (a collective when a process group runs; else decide())."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [decide() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return decide()


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def cpu_bf16_units() -> Optional[bool]:
    """Whether this CPU reports bf16 arithmetic units: True / False where it says, None where it cannot be told."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "x86", "i686"):
        cpu = torch.cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())  # what ATen dispatches on
    if machine in ("aarch64", "arm64"):
        features = [line.split(":", 1)[1].split() for line in _cpuinfo().splitlines()
                    if line.lower().startswith("features") and ":" in line]
        if features:  # Linux lists the extensions; Armv8.6's BF16 instructions show as "bf16"
            return "bf16" in features[0]
    return None  # macOS on Apple silicon, other architectures: measured instead


def cpu_bf16_speedup(size: int = 1024, repeats: int = 3, budget_s: float = float("inf")) -> float:
    """fp32 time / bf16 time of a size x size matrix product on this CPU (best of `repeats`). The bf16 side stops
    after `budget_s` (an emulated bf16 product can take seconds): its best so far then counts."""
    a32, b32 = torch.randn(size, size), torch.randn(size, size)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best(a, b) -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)  # warm-up (thread pool, packing buffers)
        times, deadline = [time.perf_counter() - t0], t0 + budget_s
        for _ in range(repeats):
            if time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    return best(a32, b32) / best(a16, b16)


def _machine_key() -> str:
    """This machine as far as the bf16 answer goes: CPU model and features, core count, torch version."""
    cpu = [line for line in _cpuinfo().splitlines() if line.lower().startswith(("model name", "flags", "features"))][:2]
    text = "|".join([platform.machine(), platform.processor(), *cpu, str(os.cpu_count()), torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _measured_cpu_choice() -> str:
    """Timed once per machine (a small product, ~1 s at most), then read from the user cache."""
    path = user_cache("cpu_precision.json")
    key = _machine_key()
    try:
        known = json.loads(path.read_text())
        if isinstance(known, dict) and known.get(key) in ("bf16", "fp32"):
            return known[key]
    except (OSError, ValueError):
        known = {}
    speedup = cpu_bf16_speedup(size=256, repeats=3, budget_s=1.0)
    choice = "bf16" if speedup >= BF16_FAST_ENOUGH else "fp32"
    log.info("this CPU reports no bf16 units either way; bf16 products measured at %.2fx fp32's speed: precision "
             "auto means %s here (kept in %s; %s=fp32|bf16 overrides)", speedup, choice, path, ENV_VAR)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({**(known if isinstance(known, dict) else {}), key: choice}))
    except OSError as e:  # a read-only home: measured again next time, nothing worse
        log.debug("cannot keep the CPU precision answer in %s: %s", path, e)
    return choice


def cpu_precision() -> str:
    """'bf16' or 'fp32': what `auto` means on this CPU, decided once per process (on rank 0 when several run)."""
    global _cpu_choice
    if _cpu_choice is None:
        def decide() -> str:
            units = cpu_bf16_units()
            return _measured_cpu_choice() if units is None else ("bf16" if units else "fp32")
        _cpu_choice = decided_by_rank_zero(decide)
    return _cpu_choice


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
            setting = cpu_precision() if device.type == "cpu" else "fp32"
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
