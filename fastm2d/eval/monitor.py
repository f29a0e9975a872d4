"""Monitors during pre-training (`train.eval_every`), on rank 0, on the training device, from data held in memory:

  rank_me              effective rank of the clip-embedding matrix of a fixed set of training crops (RankMe:
                       exp of the entropy of the normalised singular values; falls when representations collapse)
  explained_variance   cumulative explained-variance ratio of its first principal components (the curve the
                       original logs), reported as the first 16 values and the components needed for 90 %
  valid_loss           the M2D loss on fixed crops and fixed masks of `data.valid`, when given
  probe_<task>         a quick linear probe (1 seed, 50 epochs at most) on `eval.task`, when given

Each call reports its own cost (`monitor_seconds`), so the fraction of the run it takes is measured, not claimed.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import torch

from ..devices import autocast
from ..frontend import LogMelSpectrogram, normalize
from ..transfer.runtime import Runtime
from ..data import CropDataset
from .embeddings import clip_embeddings, load_clip
from .tasks import load_tasks
from .linear import linear_eval


def rank_me(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp(-sum p_k log p_k), p = singular values / their sum (+ eps)."""
    s = torch.linalg.svdvals(embeddings.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def explained_variance(embeddings: torch.Tensor) -> np.ndarray:
    """Cumulative explained-variance ratio of the principal components of the (centred) rows."""
    x = embeddings.double() - embeddings.double().mean(0)
    var = torch.linalg.svdvals(x) ** 2
    return (torch.cumsum(var, 0) / var.sum()).cpu().numpy()


class Monitor:
    """Given what it measures, not the trainer: the live model, the training crops, their statistics, the seed."""

    def __init__(self, model, dataset, norm_stats, sample_rate: int, seed: int, n_clips: int = 256,
                 task: Optional[str] = None, valid=None):
        self.model, self.sample_rate = model, sample_rate
        self.device = next(model.parameters()).device
        self.norm_stats = tuple(norm_stats)
        rng = np.random.default_rng(seed + 77)
        picks = rng.choice(len(dataset), size=min(n_clips, len(dataset)), replace=False)
        # Fixed crops (the dataset's own crops with fixed seeds), normalised once, kept on the CPU.
        self.clips = torch.stack([normalize(dataset[(int(i), int(i) * 31 + 5, 0)]["lms"].float(), *self.norm_stats)
                                  for i in picks])
        self.valid = None
        if valid is not None:
            vr = np.random.default_rng(seed + 78)
            vpick = vr.choice(len(valid), size=min(n_clips, len(valid)), replace=False)
            vds = CropDataset(valid, model.cfg.input_size[1])
            self.valid = torch.stack([normalize(vds[(int(i), int(i) * 17 + 3, 0)]["lms"].float(), *self.norm_stats)
                                      for i in vpick])
            g = torch.Generator().manual_seed(seed + 79)
            self.valid_ids = model.ids_from_noise(torch.rand(len(self.valid), model.mask_noise_shape, generator=g))
        self.tasks = []
        if task is not None:
            frontend = LogMelSpectrogram(sample_rate)
            for t in load_tasks(task):
                with torch.inference_mode():  # cached audio -> log-mel, normalised at call time
                    self.tasks.append((t, [frontend(load_clip(item, sample_rate, t)) for item in t.items]))

    def _embed(self, runtime: Runtime, lms) -> torch.Tensor:
        """Normalised log-mel, (N, 1, F, T) or a list of (F, T_i) -> (N, F'*D) clip embeddings."""
        items = list(lms) if isinstance(lms, list) else list(lms.unbind(0))
        return clip_embeddings(len(items), items.__getitem__,
                               lambda x: runtime.encode_lms(x if x.dim() == 4 else x.unsqueeze(1)), runtime)

    @torch.no_grad()
    def __call__(self) -> Dict:
        t0 = time.perf_counter()
        model = self.model
        was_training = model.training
        runtime = Runtime(model, self.sample_rate)  # eval mode; the same weights
        try:
            emb = self._embed(runtime, self.clips)
            ev = explained_variance(emb)
            row = {"rank_me": rank_me(emb), "explained_variance": [round(float(v), 5) for v in ev[:16]],
                   "components_90": int(np.searchsorted(ev, 0.9) + 1)}
            if self.valid is not None:
                losses = []
                for i in range(0, len(self.valid), 64):
                    x = self.valid[i:i + 64].to(self.device)
                    with autocast(self.device):
                        losses.append(float(model(x, self.valid_ids[i:i + 64].to(self.device))["loss_m2d"]) * len(x))
                row["valid_loss"] = sum(losses) / len(self.valid)
            for task, lms in self.tasks:
                emb_t = self._embed(runtime, [normalize(x, *self.norm_stats) for x in lms]).numpy()
                result = linear_eval(emb_t, task, seeds=1, max_epochs=50, patience=10)
                row[f"probe_{task.name}"] = result["mean"]
        finally:
            model.train(was_training)
        row["monitor_seconds"] = time.perf_counter() - t0
        return row
