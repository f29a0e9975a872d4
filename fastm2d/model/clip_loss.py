"""M2D-CLAP's contrastive loss (CLIP's symmetric InfoNCE) over the GLOBAL batch: every rank's audio and caption
embeddings gathered, so each clip is told apart from all the others in the step, as on one device.

Gradients: the gather is differentiable (torch.distributed.nn's all_gather sums each rank's gradient back to the
rank that owns the rows). Every rank computes the same global loss, so a rank's own rows receive N times the
gradient of that loss; the data-parallel engine then averages over the N ranks, which leaves exactly the
one-device gradient of the global batch. (The original gathers without gradient and puts the local rows back,
so each rank back-propagates only through its own rows and the average is 1/N of that gradient.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07, as the original
LOGIT_SCALE_MAX = math.log(100.0)  # the original clamps the learnable log-scale to [0, log 100] after each step


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, E) on each rank -> (world * B, E), rank order, differentiable; the identity on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()), dim=0)


def clip_loss(audio: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the cosine similarities of all pairs in the global batch; the pair (i, i) is
    the positive. audio, text: this rank's (B, E) embeddings; logit_scale: exp of the learnable log-scale."""
    a = gather_rows(F.normalize(audio.float(), dim=-1))
    t = gather_rows(F.normalize(text.float(), dim=-1))
    logits = logit_scale.float() * a @ t.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
