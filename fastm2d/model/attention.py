"""Multi-head self-attention with one backend switch.

`sdpa` (default) lets PyTorch pick flash / memory-efficient / cuDNN kernels on GPU and the math kernel on CPU;
`xformers` uses xformers' memory_efficient_attention (optional extra, CUDA only); `reference` is the explicit
softmax(QK^T / sqrt(d)) V the tests compare every backend with. `auto` resolves, per device, to the backend a
short measurement finds fastest there (SDPA on CPU and whenever nothing else can run).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ATTENTION_CHOICES
from ..devices import decided_by_rank_zero


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, H, N, d) -> (B, H, N, d), written out step by step."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    # Softmax in at least fp32 (bf16/fp16 inputs), in the input's precision when that is higher.
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype) @ v


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers takes [B, M, H, K]; ours is [B, H, M, K]."""
    import xformers.ops as xops
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


BACKENDS: Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sdpa": F.scaled_dot_product_attention,
    "reference": reference_attention,
    "xformers": xformers_attention,
    "auto": F.scaled_dot_product_attention,  # until `resolve_attention` picks for a device
}
CHOICES = ATTENTION_CHOICES  # one backend per choice (tests/test_attention.py checks that they agree)


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """Why backend `name` cannot run on `device`, or None."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose from {CHOICES}"
    if name != "xformers":
        return None
    if device.type != "cuda":
        return f"xformers attention has no CPU path (device {device}); use sdpa"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        return f"xformers is not installed (pip install 'fastm2d[xformers]'): {e}"
    except Exception as e:  # its compiled part needs the CUDA 12 runtime (nvidia-cuda-runtime-cu12)
        return f"xformers cannot load ({e}); it needs the CUDA 12 runtime (pip install nvidia-cuda-runtime-cu12)"
    return _probe_fails(name, device)


def _probe_fails(name: str, device: torch.device) -> Optional[str]:
    """Why one tiny bf16 forward + backward of backend `name` fails on `device`, or None. A wheel can import and
    still find no operator for this torch / CUDA (xformers built for CUDA 12 on a CUDA 13 machine): that must be a
    reason given at start-up, not a traceback from inside the first training step."""
    try:
        q, k, v = (torch.randn(1, 2, 8, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        BACKENDS[name](q, k, v).float().sum().backward()
    except Exception as e:  # any failure of the library is the reason, in one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"{name} attention fails on {device} ({type(e).__name__}: {first})"
    return None


_MEASURED: Dict[str, str] = {}


def resolve_attention(name: str, device: torch.device) -> str:
    """A concrete backend for `device`; a requested one that cannot run is an error that says why. `auto` on a GPU
    is measured once per card, on rank 0 only when several processes train: every rank must run the same kernels
    (timings differ from rank to rank, and two ranks' choices could differ)."""
    if name != "auto":
        reason = unavailable_reason(name, device)
        if reason:
            raise RuntimeError(f"model.attention={name!r}: {reason}")
        return name
    if device.type != "cuda":
        return "sdpa"
    key = torch.cuda.get_device_name(device)
    if key not in _MEASURED:
        _MEASURED[key] = decided_by_rank_zero(lambda: _fastest(device))
    return _MEASURED[key]


def _fastest(device: torch.device, rounds: int = 5, shape=(64, 12, 191, 64)) -> str:
    """Time each runnable backend on an M2D-sized bf16 problem (forward + backward), `rounds` rounds each. A backend
    that cannot run, or fails while timed, is left out with one warning saying why: `auto` then trains on SDPA
    (PyTorch's own) instead of refusing to start. Called on CPU by the tests with a backend that raises."""
    import logging
    import time

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    q, k, v = (torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    times: Dict[str, list] = {}
    for name in ("sdpa", "xformers"):
        reason = unavailable_reason(name, device)
        if reason is None:
            fn = BACKENDS[name]
            try:
                for _ in range(3):
                    fn(q, k, v).float().sum().backward()
                times[name] = []
                for _ in range(rounds):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        fn(q, k, v).float().sum().backward()
                    sync()
                    times[name].append(time.perf_counter() - t0)
            except Exception as e:  # a library that breaks under timing is a reason too, never the run's end
                times.pop(name, None)
                reason = f"{name} attention failed while timed ({type(e).__name__}: {str(e).strip()[:200]})"
        if reason and name != "sdpa":
            logging.getLogger("fastm2d").warning("model.attention=auto: %s; training uses sdpa", reason)
    return faster_beyond_noise(times)


def faster_beyond_noise(times: Dict[str, list]) -> str:
    """SDPA (in PyTorch, always there) unless xformers beats it beyond the timing noise: xformers' slowest round
    faster than SDPA's fastest."""
    if "xformers" in times and "sdpa" in times and max(times["xformers"]) < min(times["sdpa"]):
        return "xformers"
    return "sdpa"


class Attention(nn.Module):
    """Parameter names `qkv` and `proj` as in timm / the original checkpoints."""

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"attention backend {name!r} is not available; choose from {sorted(BACKENDS)}")
        self._backend = name
        self._attend = BACKENDS[name]

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """key_mask: (B, N) bool, False for keys no query may attend to (the padding of a shorter chunk batched
        with whole ones, the waveform-in ONNX graph): SDPA with that mask, whatever the backend."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if key_mask is not None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        else:
            x = self._attend(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))
