"""What a training run reads, as one object: the trainer asks it for batches from a step on, saves its position
with each checkpoint and takes the monitors' clips from it (torchtitan's stateful data loader is the model).

Three kinds of data stay behind it, each with its own loader:

  files or a store  DataLoader over CropDataset, ordered by the resumable EpochSampler (items found bad are
                    left out from then on, and saved)
  streamed shards   every rank reads its own shards (ShardCrops / ShardBatches); a checkpoint keeps each rank's
                    stream position, so a resumed run continues its epoch exactly
  DALI              decoding on CPU threads, log-mel on the GPU; model state resumes exactly, the data order restarts
                    at an epoch boundary (DALI's reader keeps its own shuffling state)

Background noise for M2D-X denoising (data.noise) opens here too: its crops travel with the training crops and
the trainer mixes them on the device.
"""
from __future__ import annotations

from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import Config, ConfigError, is_shard_spec
from ..distributed import DistInfo, all_gather_stacked
from ..run_folder import RunFolder
from . import dali  # NVIDIA DALI itself is imported only when the loader is built
from .dataset import CropDataset, training_crop
from .noise import BackgroundCrops, NoisePicker, tile_crop
from .open_source import open_source
from .sampler import EpochSampler
from .shards import POSITION_FIELDS, LeadingClips, ShardBatches, ShardCrops, ShardSource, is_stream_position, \
    resume_start, shard_source
from .sources import AUDIO_EXTS
from .stats import run_norm_stats


def open_training_source(config: Config, dist: DistInfo, run: RunFolder):
    """The training items (audio files, .npy log-mel, a prepared store or streamed shards), checked against the
    loader and the batch before anything is built on them. The offline task (M2D-X) reads them next."""
    d, t = config.data, config.train
    if d.loader == "dali":
        missing = dali.dali_missing_reason()
        if missing:
            raise ConfigError(f"data.loader=dali: {missing}; or use data.loader=reference")
        if d.repeat_short:
            raise ConfigError("data.repeat_short=true is not available with data.loader=dali (it zero-pads "
                              "short clips to the crop); use data.loader=reference")
    if is_shard_spec(d.train):
        source = shard_source(config)
    else:
        source = open_source(d.train, config, run, d.root)
        files = getattr(source, "files", None)  # a LogMelStore holds no audio files
        if d.loader == "dali" and not (files and all(f.suffix.lower() in AUDIO_EXTS for f in files)):
            raise ConfigError(f"data.loader=dali decodes audio files; {d.train} holds log-mel "
                              f"(a prepared store or .npy files): use data.loader=reference")
    per_step = t.batch_size * dist.world_size
    if max(len(source), d.min_epoch_items) < per_step:
        raise ConfigError(f"{len(source)} usable training items cannot fill one batch of "
                          f"{t.batch_size} x {dist.world_size} process(es): lower train.batch_size (and "
                          f"raise train.accum_steps to keep the effective batch), or repeat the list with "
                          f"data.min_epoch_items={per_step * 100}")
    return source


class TrainingData:
    """Batches of raw log-mel crops (dicts of 'lms' and, when the run makes them, 'bg' background crops and
    'offline' targets) from any micro-batch on; `state_dict` / `load_state_dict` for the checkpoint.

    `offline_targets` (item -> label or feature row) and `sample_weights` (per item) come from M2D-X's offline
    task, which is built on the opened source (open_training_source) before this object."""

    def __init__(self, config: Config, source, dist: DistInfo, run: RunFolder, device: torch.device,
                 offline_targets=None, sample_weights: Optional[np.ndarray] = None):
        self.config, self.source, self.dist, self.run, self.device = config, source, dist, run, device
        self.offline_targets = offline_targets
        t = config.train
        self.sampler = EpochSampler(len(source), t.batch_size, t.seed, config.data.min_epoch_items, dist.rank,
                                    dist.world_size, weights=sample_weights)
        self.skipped = 0  # items substituted because they could not be read (this rank, since the start)
        self._saved_stream: Optional[dict] = None  # shards: the checkpoint's positions, every rank's
        self._stream: Optional[tuple] = None  # shards: (epoch, ShardBatches.state) as batches are handed out
        self._open_noise()
        self.dataset = None if self.streamed else \
            CropDataset(source, config.model.input_size[1], config.data.on_bad_file, self.background,
                        bad_list=run.bad_files("training"), offline=offline_targets,
                        repeat_short=config.data.repeat_short)

    @property
    def streamed(self) -> bool:
        return isinstance(self.source, ShardSource)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def _open_noise(self) -> None:
        """data.noise: the second source, its crop for every training sample and its mean (eq. 5 centres each
        set by its own mean)."""
        config, noise = self.config, self.config.data.noise
        self.noise, self.background, self.eta, self.noise_mean = None, None, 0.0, 0.0
        if noise.train is None or noise.eta <= 0:
            return
        self.noise = open_source(noise.train, config, self.run, noise.root, label="noise", seed_offset=1)
        self.background = BackgroundCrops(self.noise, NoisePicker(len(self.noise), config.train.seed),
                                          config.model.input_size[1], getattr(self.noise, "dtype", np.float32))
        self.eta = noise.eta
        self.noise_mean = run_norm_stats(self.noise, config, noise.norm_stats, self.run.noise_stats,
                                         crop=tile_crop)[0]

    def norm_stats(self) -> List[float]:
        """The training set's statistics (a fresh run's; a resumed one has them in its model): configured, cached
        per data set, or computed from training crops."""
        d = self.config.data
        return run_norm_stats(self.source, self.config, d.norm_stats, self.run.norm_stats,
                              crop=training_crop(d.repeat_short))

    # ------------------------------------------------------------------------------------- the batches ----
    def batches(self, micro_batch: int) -> Iterator[dict]:
        """Endless batches from micro-batch number `micro_batch` of the run (so a resumed run continues the order)."""
        if self.config.data.loader == "dali":
            yield from self._dali_batches()
        elif self.streamed:
            yield from self._shard_batches(micro_batch)
        else:
            yield from self._loader_batches(micro_batch)

    def _loader_batches(self, micro_batch: int) -> Iterator[dict]:
        epoch, batch = divmod(micro_batch, self.batches_per_epoch)
        workers = self.config.data.num_workers
        # One loader for the run: persistent workers keep their caches and open memory maps across epochs; the
        # sampler is read in this process when each epoch's iterator starts, so its position still applies.
        loader = DataLoader(self.dataset, batch_size=self.config.train.batch_size, sampler=self.sampler,
                            num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(self.config.train.seed),  # not the global RNG
                            pin_memory=self.device.type == "cuda")
        while True:
            self.sampler.set_position(epoch, batch)
            for item in loader:
                self.skipped += int(item["skipped"].sum())  # CPU tensors: no device sync
                bad = item["bad"][item["bad"] >= 0]
                if len(bad):
                    self.sampler.bad.update(bad.tolist())  # left out from now on
                yield item
            epoch, batch = epoch + 1, 0

    def _shard_batches(self, micro_batch: int) -> Iterator[dict]:
        """Every rank reads its own shards, the same number of batches per epoch; a resumed run continues its
        epoch's stream exactly (data/shards/stream.py)."""
        t, bpe = self.config.train, self.batches_per_epoch
        epoch, used = divmod(micro_batch, bpe)
        workers = self.config.data.num_workers
        start = resume_start(self._saved_stream, epoch, used, self.dist.rank, self.dist.world_size,
                             max(workers, 1))
        while True:
            crops = ShardCrops(self.source, epoch, t.seed, self.dist.rank, self.dist.world_size, bpe, t.batch_size,
                               bad_list=self.run.bad_files("training"), start=start, background=self.background,
                               targets=self.offline_targets)
            stream = ShardBatches(crops, workers)
            self._stream = (epoch, stream.state)  # advanced as batches are handed out: what a checkpoint keeps
            for batch in stream:
                self.skipped += int(batch["skipped"])
                yield batch
            epoch, start = epoch + 1, None

    def _dali_batches(self) -> Iterator[dict]:
        loader = self.dali_loader()
        while True:
            for lms in loader:
                yield {"lms": lms}

    def dali_loader(self, with_index: bool = False):
        """This rank's DALI loader: its own shard of the files (the global batch is N different batches, not N
        copies of one), its own crop positions (seed + rank), and the node's cores shared among its ranks."""
        c = self.config
        return dali.DaliLogMelLoader(self.source.files, c.train.batch_size, self.device,
                                     sample_rate=c.data.sample_rate, crop_frames=c.model.input_size[1],
                                     num_threads=dali.dali_threads(c.data.num_workers, self.dist.local_world_size),
                                     seed=c.train.seed + self.dist.rank, shard_id=self.dist.rank,
                                     num_shards=self.dist.world_size, with_index=with_index)

    # --------------------------------------------------------------------------------- the monitors ----
    def monitor_clips(self):
        """The monitors' fixed clips, indexed like CropDataset (streamed shards: the first usable samples)."""
        if self.dataset is not None:
            return self.dataset
        return LeadingClips(self.source, self.config.eval.clips, self.config.train.seed)

    def validation(self):
        """data.valid opened like the training data, or None."""
        d = self.config.data
        return open_source(d.valid, self.config, self.run, d.root, label="valid") if d.valid else None

    # ------------------------------------------------------------------------ the checkpoint's part ----
    def state_dict(self) -> dict:
        """The items found bad and, for streamed shards, every rank's stream position: a collective call, made by
        every rank (the Checkpointer's save)."""
        state = {"bad_items": sorted(self.sampler.bad)}
        if self.streamed:
            epoch, rows = self._stream or (0, [[0] * len(POSITION_FIELDS)])
            gathered = all_gather_stacked(torch.tensor(rows, dtype=torch.int64, device=self.device))
            state["shard_position"] = {"epoch": epoch, "rows": gathered.cpu().tolist()}
        return state

    def load_state_dict(self, obj: dict) -> None:
        self.sampler.bad.update(obj.get("bad_items", []))
        self._saved_stream = obj.get("shard_position")

    @staticmethod
    def state_problem(obj: dict) -> Optional[str]:
        """Why a checkpoint's data part cannot be this object's state (None when it can)."""
        if "shard_position" in obj and not is_stream_position(obj["shard_position"]):
            return (f"shard_position is not a stream position (epoch and, per rank and loader worker, "
                    f"{', '.join(POSITION_FIELDS)})")
        bad = obj.get("bad_items", [])
        if not isinstance(bad, list) or not all(type(i) is int and i >= 0 for i in bad):
            return "bad_items is not a list of item numbers"
        return None


__all__ = ["TrainingData", "open_training_source"]
