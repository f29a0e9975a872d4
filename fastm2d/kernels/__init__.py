"""fastm2d.kernels: the M2D hot-path operations, each with its pure-PyTorch reference beside the fast version.

The repository's top-level kernels/ shows these files (links to them; it has no __init__.py on purpose: a bare
`kernels` would pass for the Hugging Face package of that name, which transformers imports). One switch selects the
implementation: `model.kernels` in the config (auto | triton | reference) and the environment variable
FASTM2D_KERNELS, which wins. `auto` = Triton on CUDA, reference elsewhere; `triton` on CPU runs only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from ..config import KERNEL_CHOICES
from ._triton import HAVE_TRITON, triton_unavailable_reason
from .l2norm_mse import l2norm_mse_reference, l2norm_mse_triton
from .masking import (gather_masked_reference, gather_masked_triton, gather_visible_reference, gather_visible_triton,
                      restore_order_reference, restore_order_triton, unshuffle_with_mask_tokens_reference,
                      unshuffle_with_mask_tokens_triton)
from .noise_mix import noise_mix_reference, noise_mix_triton

__all__ = ["MODES", "ENV_VAR", "OPS", "REFERENCE", "TRITON", "HAVE_TRITON", "select", "requested_mode",
           "triton_unavailable_reason", "gather_visible_reference", "gather_visible_triton",
           "unshuffle_with_mask_tokens_reference", "unshuffle_with_mask_tokens_triton", "gather_masked_reference",
           "gather_masked_triton", "restore_order_reference", "restore_order_triton", "l2norm_mse_reference", "l2norm_mse_triton", "noise_mix_reference",
           "noise_mix_triton"]

MODES = KERNEL_CHOICES  # model.kernels' choices, typed once in the schema
ENV_VAR = "FASTM2D_KERNELS"

OPS = ("gather_visible", "unshuffle_with_mask_tokens", "gather_masked", "restore_order", "l2norm_mse", "noise_mix")


def _implementations(kind: str) -> SimpleNamespace:
    """The `<op>_<kind>` function of every op, e.g. REFERENCE.l2norm_mse is l2norm_mse_reference."""
    return SimpleNamespace(name=kind, **{op: globals()[f"{op}_{kind}"] for op in OPS})


REFERENCE = _implementations("reference")
TRITON = _implementations("triton")


def requested_mode(config_mode: str = "auto") -> str:
    mode = os.environ.get(ENV_VAR, config_mode) or config_mode
    if mode not in MODES:
        source = ENV_VAR if ENV_VAR in os.environ else "model.kernels"
        raise ValueError(f"{source}={mode!r}: expected one of {MODES}")
    return mode


def select(config_mode: str, device: torch.device) -> SimpleNamespace:
    """The namespace of operations to use for tensors on `device`."""
    mode = requested_mode(config_mode)
    if mode == "reference":
        return REFERENCE
    reason = triton_unavailable_reason(device)
    if mode == "auto":
        return TRITON if reason is None and device.type == "cuda" else REFERENCE
    if reason is not None:
        raise RuntimeError(f"kernels='triton' requested, but {reason}; or use model.kernels=reference "
                           f"({ENV_VAR}=reference)")
    return TRITON
