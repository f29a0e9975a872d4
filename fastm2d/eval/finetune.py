"""`fastm2d finetune WEIGHTS TASK`: the original's fine-tuning recipe family on an evaluation task.

The encoder (position table resampled or trimmed to the task's clip length) + BatchNorm (affine=False) + a linear
head on the time mean of eq. 4 features; SpecAugment-style time / frequency masks, mixup and random resize crop
on the log-mel; AdamW (or LARS, SGD) with layer-wise lr decay, warm-up then cosine; bf16 autocast on GPU, the
attention kernel chosen as in pre-training, optionally torch.compile. The best-on-valid weights are saved with
their test score.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import write_atomic
from ..devices import autocast_dtype
from ..checkpoint import atomic_save
from ..config import ConfigError
from ..errors import DataError, TrainingDiverged
from .embeddings import load_clip
from .lars import LARS
from .tasks import EvalTask
from ..frontend import SILENCE_LOG
from ..transfer.runtime import load_encoder

log = logging.getLogger("fastm2d.finetune")


@dataclass
class FinetuneConfig:
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3  # for the head; the encoder's layers get lr * layer_decay^(depth - i)
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    optimizer: str = "adamw"  # adamw | sgd | lars
    mixup: float = 0.3  # Beta(alpha, alpha); 0 = off
    freq_mask: int = 16  # SpecAugment: up to this many mel bins masked (0 = off)
    time_mask: int = 48  # ... and up to this many frames
    rrc: bool = True  # random resize crop of the log-mel
    seed: int = 0
    attention: str = "auto"  # as model.attention: fused kernels on GPU (xformers / SDPA), 'reference' to check
    compile: bool = False  # torch.compile the classifier's forward (the first epochs pay the compilation)


class Classifier(nn.Module):
    def __init__(self, runtime, n_classes: int, head_std: float = 2e-5):
        super().__init__()
        self.runtime = runtime
        self.norm = nn.BatchNorm1d(runtime.feature_dim, affine=False)
        self.head = nn.Linear(runtime.feature_dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.runtime.encode_lms(lms).mean(1)))


def _layer_groups(model: Classifier, cfg: FinetuneConfig) -> List[Dict]:
    """Layer-wise lr decay: patch embedding and tokens at depth 0, block i at i + 1, norm and head at the top.

    Not timm.optim.param_groups_layer_decay: it reads the layer of each parameter from a timm model's
    `group_matcher`, which our encoder (original key names, M2D's CLS and position handling) does not have; the
    rule here is the same one (MAE's), written for these parameter names."""
    enc = model.runtime.encoder
    depth = len(enc.blocks) + 1
    groups: Dict[int, List] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".blocks." in name:
            layer = int(name.split(".blocks.")[1].split(".")[0]) + 1
        elif any(k in name for k in ("patch_embed", "cls_token")):
            layer = 0
        else:
            layer = depth
        groups.setdefault(layer, []).append(p)
    return [{"params": ps, "lr_scale": cfg.layer_decay ** (depth - layer)} for layer, ps in sorted(groups.items())]


def _augment(x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, g: torch.Generator):
    b, _, f, t = x.shape
    if cfg.rrc:  # crop 60-100 % of each axis somewhere, resize back (the same for the batch: cheap, still random)
        fh, tw = (int(round(n * float(torch.empty(1).uniform_(0.6, 1.0, generator=g)))) for n in (f, t))
        f0 = int(torch.randint(0, f - fh + 1, (1,), generator=g))
        t0 = int(torch.randint(0, t - tw + 1, (1,), generator=g))
        x = F.interpolate(x[..., f0:f0 + fh, t0:t0 + tw], size=(f, t), mode="bicubic", align_corners=False)
    if cfg.freq_mask or cfg.time_mask:
        x = x.clone()
        for i in range(b):
            w = int(torch.randint(0, cfg.freq_mask + 1, (1,), generator=g))
            s = int(torch.randint(0, max(1, f - w), (1,), generator=g))
            x[i, :, s:s + w] = 0
            w = int(torch.randint(0, min(cfg.time_mask, t // 4) + 1, (1,), generator=g))
            s = int(torch.randint(0, max(1, t - w), (1,), generator=g))
            x[i, :, :, s:s + w] = 0
    if cfg.mixup > 0:
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g))).beta(cfg.mixup, cfg.mixup))
        perm = torch.randperm(b, generator=g)
        x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
    return x, y


def _fixed_length(runtime, clips: List[torch.Tensor], frames: int) -> torch.Tensor:
    """Normalised log-mel clips (F, T_i) -> (N, 1, F, frames): each clip's first `frames` frames, padded with
    (normalised) silence when shorter; held in memory."""
    silence = float(runtime.normalize(torch.tensor(SILENCE_LOG)))
    out = torch.full((len(clips), 1, runtime.cfg.input_size[0], frames), silence)
    for k, lms in enumerate(clips):
        out[k, 0, :, :min(frames, lms.shape[-1])] = lms[:, :frames]
    return out


def finetune(weights: str, task: EvalTask, out_dir: str | Path, cfg: FinetuneConfig = FinetuneConfig(),
             device: str = "cpu", frames: int = 0) -> Dict:
    torch.manual_seed(cfg.seed)
    probe = load_encoder(weights)
    clips = [probe.to_lms(load_clip(i, probe.sample_rate, task), probe.sample_rate)[0, 0] for i in task.items]
    pt = probe.cfg.patch_size[1]
    if frames and frames < pt:
        raise DataError(f"--frames {frames}: at least one patch width ({pt} frames, {pt * 10} ms) is needed")
    frames = frames or max(pt, int(np.median([c.shape[-1] for c in clips[:50]])) // pt * pt)
    # position table trimmed or resampled to the clip length
    runtime = load_encoder(weights, input_frames=frames, attention=cfg.attention)
    x_all = _fixed_length(runtime, clips, frames)
    # LARS steps each matrix in proportion to its own norm: a head starting at 2e-5 would hardly move (as MAE's
    # LARS linear probe, it starts at 0.01)
    model = Classifier(runtime, task.labels.shape[1], head_std=0.01 if cfg.optimizer == "lars" else 2e-5).to(device)
    forward = torch.compile(model) if cfg.compile else model  # same parameters: the saved state is the model's
    groups = _layer_groups(model, cfg)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "lars":
        opt = LARS(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    tr, va, te = task.index("train"), task.index("valid"), task.index("test")
    y_all = torch.from_numpy(task.labels)
    steps_per_epoch = max(1, len(tr) // cfg.batch_size)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    g = torch.Generator().manual_seed(cfg.seed)
    dtype = autocast_dtype(torch.device(device))  # bf16 on a GPU and on a CPU with fast bf16 (fastm2d/devices.py)
    amp = dict(device_type=torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def evaluate(idx) -> float:
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            logits = torch.cat([forward(x_all[i].to(device)).float().cpu() for i in np.array_split(idx, max(1, len(idx) // 64))])
        return task.score(logits.numpy(), idx)

    if cfg.epochs < 1:
        raise ConfigError(f"finetune epochs={cfg.epochs}: at least 1")
    best, best_state, step, history = -1.0, None, 0, []
    out_dir = Path(out_dir)
    weights_file = out_dir / f"finetuned-{task.name}.pth"
    for epoch in range(cfg.epochs):
        model.train()
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # read once per epoch: no sync per step
        order = torch.from_numpy(tr)[torch.randperm(len(tr), generator=g)]
        for idx in order[: steps_per_epoch * cfg.batch_size].split(cfg.batch_size):
            lr = cfg.lr * (step / max(1, warm) if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for grp in opt.param_groups:
                grp["lr"] = lr * grp["lr_scale"]
            x, y = _augment(x_all[idx], y_all[idx], cfg, g)
            with torch.autocast(**amp):
                logits = forward(x.to(device)).float()
            y = y.to(device)
            loss = F.binary_cross_entropy_with_logits(logits, y) if task.multi_label else \
                torch.sum(-y * F.log_softmax(logits, -1), -1).mean()
            nonfinite |= ~torch.isfinite(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if bool(nonfinite):  # NaN weights score like any others (argmax of NaN logits): stop, keep no NaN weights
            kept = (f"the weights of epoch {max(history, key=lambda h: h['valid'])['epoch']} (valid {best:.4f}) "
                    f"stay in {weights_file}" if best_state is not None else "no weights were written")
            raise TrainingDiverged(f"finetune {task.name}: the loss became NaN/inf in epoch {epoch + 1}; {kept}. "
                                   f"Try a lower lr (now {cfg.lr:g}).")
        valid = evaluate(va)
        history.append({"epoch": epoch + 1, "loss": loss.item(), "valid": valid})
        if valid > best:
            best = valid
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            # Everything a reload needs: `load_encoder` / `load_classifier` / `fastm2d tag` read this file alone.
            atomic_save({"model": best_state, "epoch": epoch + 1, "finetune": asdict(cfg), "frames": frames,
                         "classes": list(task.classes), "multi_label": bool(task.multi_label), "task": task.name,
                         "model_config": asdict(runtime.cfg), "sample_rate": runtime.sample_rate},
                        weights_file)
    if best_state is None:  # never a file left in out_dir by another run: only this run's own best weights
        raise ConfigError(f"finetune: no epoch of {cfg.epochs} gave a finite validation score (diverged?); "
                          f"try a lower lr")
    model.load_state_dict(best_state)
    result = {"task": task.name, "metric": task.metric, "valid": best,
              "test": evaluate(te), "frames": frames, "weights": str(weights), "config": asdict(cfg), "history": history}
    write_atomic(out_dir / f"finetuned-{task.name}.json", json.dumps(result, indent=1) + "\n")
    return result
