"""M2D-X's offline task at start-up: which target, how wide, which loss, and (for teachers) the frozen model.

  labels      (M2D-AS)  multi-hot clip labels from a CSV; per-frame logits averaged over time; BCE (CE single-label)
  distill     (M2D-S)   a domain teacher's per-frame features: precomputed .npy files, or a checkpoint run here
  regularize            the checkpoint the run starts from (train.init_from) as a frozen teacher: further
                        pre-training on small data that stays near the original model
  clap      (M2D-CLAP)  a caption embedding per clip from a frozen text encoder (encoded once, cached) or a
                        precomputed file; CLIP loss against the projected online tokens over the global batch

Everything is checked here, before the first step: a missing teacher, one of another sample rate or time patch
width, labels or features that do not fit the training list are each one ConfigError / DataError line.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, ModelConfig, check_model_config
from ..data.captions import (CaptionTargets, NamedCaptions, default_cache_dir, embed_captions, encoder_fingerprint,
                             read_captions, read_precomputed)
from ..data.offline_targets import FeatureTargets, LabelTargets, ShardLabels
from ..data.shards import ShardSource
from ..frontend import FRONTEND_PARAMS, normalize, sound_info
from ..transfer.runtime import load_encoder
from ..distributed import barrier, dist_from_env

log = logging.getLogger("fastm2d.train")


@dataclass
class OfflineTask:
    task: str
    dim: int
    loss: str  # norm_mse | bce | ce
    targets: Optional[object] = None  # per item, in the data loader: LabelTargets / FeatureTargets
    teacher: Optional[torch.nn.Module] = None  # a transfer Runtime, run on the device
    sample_weights: Optional[object] = None  # label-balanced sampling
    text_encoder: Optional[str] = None  # clap: the caption encoder, recorded in the model config for zero-shot
    text_pooling: str = "mean"


class Teacher(torch.nn.Module):
    """A frozen encoder: raw log-mel crops -> its eq. 4 frame features (B, T', F'*D), in its own normalisation."""

    def __init__(self, runtime, path):
        super().__init__()
        self.runtime = runtime.eval().requires_grad_(False)
        self.path = str(path)
        self.mean, self.std = runtime.encoder.norm_stats.tolist()
        self.dim = runtime.feature_dim

    @torch.no_grad()
    def forward(self, raw_lms: torch.Tensor) -> torch.Tensor:
        return self.runtime.encode_lms(normalize(raw_lms, self.mean, self.std))


def load_teacher(path: str, config: Config, device: torch.device) -> Teacher:

    try:
        runtime = load_encoder(path, device=device)
    except CheckpointError as e:
        raise ConfigError(f"offline teacher: {e}") from None
    m = config.model
    if runtime.sample_rate != config.data.sample_rate:
        raise ConfigError(f"offline teacher {path}: a {runtime.sample_rate} Hz model, this run's data.sample_rate is "
                          f"{config.data.sample_rate}")
    if runtime.cfg.patch_size[1] != m.patch_size[1] or runtime.cfg.input_size[0] != m.input_size[0]:
        raise ConfigError(f"offline teacher {path}: patch {runtime.cfg.patch_size} on {runtime.cfg.input_size} does not "
                          f"give this model's frames ({m.patch_size} on {m.input_size}): the time patch width must match")
    return Teacher(runtime, path).to(device)


def _durations(names, sample_rate: int, frames=None):
    """Seconds of audio per item: from the audio header when the file exists, else from its log-mel length."""
    hop_s = FRONTEND_PARAMS[sample_rate]["hop_length"] / sample_rate
    out = []
    for i, name in enumerate(names):
        try:
            n, rate = sound_info(name)
            out.append(n / rate)
        except Exception:  # a .npy log-mel or a store item whose audio is elsewhere
            out.append(float(frames[i]) * hop_s if frames is not None else 0.0)
    return out


def build_offline_task(config: Config, source, device: torch.device) -> Optional[OfflineTask]:
    o, m = config.offline, config.model
    if o.task == "none":
        return None
    names = list(source.names)
    if (o.task in ("labels", "clap") or o.features) and names and names[0].startswith("synthetic:"):
        raise ConfigError(f"offline.task={o.task} needs training files to attach its targets to, not data.train=synthetic")
    if o.task == "labels" and isinstance(source, ShardSource):  # labels in each streamed sample's JSON
        targets = ShardLabels(Path(o.classes), o.single_label)
        log.info("offline task: labels, %d classes from %s, read from each sample's JSON", targets.dim, o.classes)
        return OfflineTask("labels", targets.dim, "ce" if o.single_label else "bce", targets=targets)
    if o.task == "labels":
        csv = Path(o.labels or config.data.train)
        targets = LabelTargets(names, csv, Path(o.classes) if o.classes else None,
                               Path(config.data.root) if config.data.root else None, o.single_label)
        log.info("offline task: labels, %d classes from %s", targets.dim, csv)
        return OfflineTask("labels", targets.dim, "ce" if o.single_label else "bce", targets=targets,
                           sample_weights=targets.balanced_weights() if o.balanced else None)
    if o.task == "clap":
        return build_clap_task(config, source, device)
    if o.task == "distill" and o.features is not None:
        hop = FRONTEND_PARAMS[config.data.sample_rate]["hop_length"]
        frames = getattr(source, "frames", None)
        targets = FeatureTargets(names, Path(o.features), o.feature_rate,
                                 _durations(names, config.data.sample_rate, frames), hop / config.data.sample_rate,
                                 m.patch_size[1], m.input_size[1] // m.patch_size[1])
        log.info("offline task: distillation from %s (%d wide, %g Hz)", o.features, targets.dim, o.feature_rate)
        return OfflineTask("distill", targets.dim, "norm_mse", targets=targets)
    path = o.teacher or config.train.init_from
    teacher = load_teacher(path, config, device)
    log.info("offline task: %s, teacher %s (%d-wide frame features)", o.task, path, teacher.dim)
    return OfflineTask(o.task, teacher.dim, "norm_mse", teacher=teacher)


def build_clap_task(config: Config, source, device: torch.device) -> OfflineTask:
    """Caption embeddings for every training file. With a text encoder, the first rank encodes what the cache
    does not hold while the others wait, then every rank reads the cache (one model load per run, not per rank)."""
    o = config.offline
    streamed = isinstance(source, ShardSource)  # targets found by each sample's file name, not by item
    if o.caption_embeddings is not None:
        embeddings = read_precomputed(Path(o.caption_embeddings))
        targets = NamedCaptions.from_precomputed(embeddings, o.caption_embeddings) if streamed else \
            CaptionTargets.from_precomputed(source.names, embeddings, o.caption_embeddings)
        log.info("offline task: clap, %d-wide precomputed caption embeddings from %s", targets.dim,
                 o.caption_embeddings)
        return OfflineTask("clap", targets.dim, "clip", targets=targets, text_encoder=o.text_encoder,
                           text_pooling=o.text_pooling)
    csv = Path(o.captions or config.data.train)
    captions = read_captions(csv, Path(config.data.root) if config.data.root else None)
    fingerprint = encoder_fingerprint(o.text_encoder, o.text_pooling)
    cache = Path(o.caption_cache) if o.caption_cache else default_cache_dir()
    state = {}

    def encode(texts):
        if "encoder" not in state:
            from ..transfer.clap import TextEncoder  # transformers: loaded only when something is not cached
            try:
                state["encoder"] = TextEncoder(o.text_encoder, o.text_pooling).to(device)
            except CheckpointError as e:
                raise ConfigError(f"offline.text_encoder: {e}") from None
        return state["encoder"](texts).float().cpu().numpy()

    first = dist_from_env().rank == 0
    if not first:
        barrier()  # the first rank encodes and fills the cache

    def embed(texts):
        return embed_captions(texts, encode, fingerprint, cache)

    # streamed shards: every clip of the CSV (the stream is not read up front), found by name per sample
    targets = NamedCaptions.from_texts(captions, str(csv), embed) if streamed else \
        CaptionTargets.from_texts(source.names, captions, str(csv), embed)
    if first:
        barrier()
    state.clear()
    table = targets.targets.table if streamed else targets.table
    log.info("offline task: clap, %d captions of %d clips from %s, %d-wide embeddings by %s (%s pooling)",
             len(table), len(captions) if streamed else len(source.names), csv, targets.dim, o.text_encoder,
             o.text_pooling)
    return OfflineTask("clap", targets.dim, "clip", targets=targets, text_encoder=o.text_encoder,
                       text_pooling=o.text_pooling)


def final_model_config(task: Optional[OfflineTask], m: ModelConfig) -> ModelConfig:
    """The model config the task needs: model.off_dim / off_loss filled from it (a conflicting explicit value is
    an error), checked again before any model is built."""
    if task is None:
        return m
    if m.off_dim and m.off_dim != task.dim:
        raise ConfigError(f"model.off_dim={m.off_dim}, but offline.task={task.task} gives {task.dim}-wide targets")
    final = dataclasses.replace(m, off_dim=task.dim, off_loss=task.loss)
    if task.task == "clap":  # zero-shot must read captions with the encoder the run trained against
        final = dataclasses.replace(final, text_encoder=task.text_encoder, text_pooling=task.text_pooling)
    check_model_config(final)
    return final


__all__ = ["OfflineTask", "Teacher", "build_offline_task", "final_model_config"]
