"""Named ranges around a training step's phases, for torch.profiler (record_function) and Nsight (NVTX), with the
peak CUDA memory of each: free when nobody profiles.

    with phase("backward"):
        loss.backward()

While no profiler window is open (`train.profile.steps`, train/profiling.py) `phase()` returns one shared null
context: no record_function, no NVTX call, no allocation (tests/test_profiling.py counts them). Inside a compiled
region the ranges are left out too (Dynamo would trace them into the graph; the compiled graph shows as its own
operators in the trace). Ranges never nest: each names one slice of the step, so the phases add up to the step.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

PREFIX = "fastm2d/"  # every range's name starts with it, so a trace's phases are found by name
STEP = "step"  # the range around one whole profiled step (data wait to logging)
PHASES = ("data wait", "offline teacher", "masking", "online forward", "predictor", "target forward", "loss",
          "backward", "optimizer", "ema", "logging")

_NULL = contextlib.nullcontext()
_recording = False
_cuda = False
peaks: Dict[str, Dict[str, float]] = {}  # phase -> {"allocated_GiB", "reserved_GiB"}: the largest seen while recording


def start_recording(cuda: bool) -> None:
    global _recording, _cuda
    _recording, _cuda = True, cuda
    peaks.clear()


def stop_recording() -> None:
    global _recording
    _recording = False


def recording() -> bool:
    return _recording


def phase(name: str):
    """The range for one phase of the step (one of PHASES, or STEP)."""
    # is_compiling() first: Dynamo then folds the call away without guarding on (and recompiling for) _recording
    if torch.compiler.is_compiling() or not _recording:
        return _NULL
    return _Range(name)


class _Range:
    __slots__ = ("name", "rf")

    def __init__(self, name: str):
        self.name = name
        self.rf: Optional[torch.profiler.record_function] = None

    def __enter__(self):
        self.rf = torch.profiler.record_function(PREFIX + self.name)
        self.rf.__enter__()
        if _cuda:
            torch.cuda.nvtx.range_push(PREFIX + self.name)
            if self.name != STEP:
                torch.cuda.reset_peak_memory_stats()  # host-side allocator counters: no device sync
        return self

    def __exit__(self, *exc):
        if _cuda:
            torch.cuda.nvtx.range_pop()
            if self.name != STEP:
                seen = peaks.setdefault(self.name, {"allocated_GiB": 0.0, "reserved_GiB": 0.0})
                seen["allocated_GiB"] = max(seen["allocated_GiB"], torch.cuda.max_memory_allocated() / 2**30)
                seen["reserved_GiB"] = max(seen["reserved_GiB"], torch.cuda.max_memory_reserved() / 2**30)
        self.rf.__exit__(*exc)
        return False
