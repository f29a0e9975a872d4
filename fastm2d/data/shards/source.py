"""A run's shards as a source: their sample counts (shards.json, webdataset's index, a given number or a listing
pass), each sample's log-mel with the run's short-clip rule, its training crop, and the first samples' crops
(normalisation statistics, the monitors' clips)."""
from __future__ import annotations

import io
import itertools
import json
import logging
from typing import Iterator, List, Optional

import numpy as np
import torch

from ...config import ConfigError
from ...frontend import AudioReadError, LogMelSpectrogram, decode_audio, first_line, pad_samples
from ..dataset import crop_clip, padded_lms
from ..norm_stats_file import mean_std
from ..sources import DataError, sample_name
from ..store import item_span, warn_if_prepared_shorter
from .counts import sample_counts
from .fetching import AUDIO_KEYS, MANIFEST, TOO_LARGE, audio_key, fetch_samples, manifest_address, open_stream, \
    shard_file_name, shard_urls

log = logging.getLogger("fastm2d.data")


class ShardSource:
    """The shards of a run and their sample counts (from shards.json beside them)."""

    def __init__(self, spec: str, sample_rate: int, frames: int, pad_to: int, stats_items: int = 10000,
                 seed: int = 0, repeat_short: bool = False, index: Optional[str] = None, per_shard: int = 0):
        self.urls = shard_urls(spec)
        if not self.urls:
            raise DataError(f"data.train={spec}: no shard")
        manifest_url = manifest_address(self.urls[0])
        manifest = {}
        if not (index or per_shard):  # prepare's manifest: the fast path (and the log-mel shards' description)
            try:
                with open_stream(manifest_url) as f:
                    manifest = json.loads(f.read())
                counts = {s["file"]: int(s["samples"]) for s in manifest["shards"]}
            except Exception as e:  # noqa: BLE001 - absent (shards other tools wrote) or unreadable: counted
                manifest, why = {}, f"no {MANIFEST} at {manifest_url} ({first_line(e)})"
        if manifest:
            missing = [u for u in self.urls if shard_file_name(u) not in counts]
            if missing:
                raise DataError(f"{manifest_url}: no entry for {len(missing)} of the shards, e.g. {missing[0]}")
            self.counts = [counts[shard_file_name(u)] for u in self.urls]
        else:  # webdataset tars from other tools: their index, a given count, or one listing pass
            self.counts = sample_counts(self.urls, why if not (index or per_shard) else f"data.train={spec}",
                                        index, per_shard)
        self.sample_rate, self.frames, self.pad_to = sample_rate, frames, pad_to
        self.stats_items, self.seed, self.repeat_short = stats_items, seed, repeat_short
        self.names = [f"{u}#{n}" for u, n in zip(self.urls, self.counts)]  # what statistics are computed from
        self._stats = None
        self.logmel = manifest.get("format") == "fastm2d-logmel-shards"  # samples hold log-mel, not audio
        if self.logmel:
            made_at = manifest.get("frontend", {}).get("sample_rate", 0)
            if type(made_at) is not int:
                raise DataError(f"{manifest_url}: frontend.sample_rate={made_at!r}: expected an integer (Hz)")
            if made_at != sample_rate:
                raise DataError(f"{manifest_url}: log-mel made at {made_at} Hz, this run's data.sample_rate is "
                                f"{sample_rate}")
            warn_if_prepared_shorter(manifest_url, manifest, frames, repeat_short)

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def norm_stats(self) -> List[float]:
        """Mean and std of log-mel over one random crop of each of the first `stats_items` samples (streamed in
        shard order; float64 sums), the crops training takes."""
        if self._stats is None:
            self._stats = list(mean_std(itertools.islice(self.leading_crops(self.seed), self.stats_items),
                                        f"{self.urls[0]}: no readable sample to compute statistics from"))
        return self._stats

    def log_mel(self, sample: dict, frontend: LogMelSpectrogram) -> np.ndarray:
        """A sample -> log-mel (F, T) with the short-clip rule applied (float32; log-mel shards: their dtype).
        Audio (its original bytes): the files' own decoder and padding (frontend.decode_audio, dataset.padded_lms).
        Log-mel shards: the stored array cut as a store cuts it for this crop (store.item_span)."""
        name = sample_name(sample)
        if TOO_LARGE in sample:  # its member was not read: the header declared more than a sample may hold
            raise AudioReadError(f"{name}: {bytes(sample[TOO_LARGE]).decode(errors='replace')}")
        if not self.logmel:
            key = audio_key(sample)
            if key is None:
                raise AudioReadError(f"{name}: no audio member ({', '.join(AUDIO_KEYS)})")
            return padded_lms(decode_audio(io.BytesIO(sample[key]), name, self.sample_rate), frontend, self.pad_to)
        try:
            lms = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            audio_frames = int(json.loads(sample["json"])["audio_frames"])
        except Exception as e:  # noqa: BLE001 - a missing member, a damaged array or JSON: this sample only
            raise AudioReadError(f"{name}: not a log-mel sample ({first_line(e)})") from None
        if lms.ndim != 2 or lms.shape[0] != frontend.mel.n_mels or lms.shape[1] < 1 or not np.isfinite(lms).all():
            raise AudioReadError(f"{name}: log-mel of shape {lms.shape} (or NaN / inf), expected "
                                 f"({frontend.mel.n_mels}, frames)")
        span = int(item_span(lms.shape[1], audio_frames, self.frames, self.repeat_short))
        return lms[:, :max(span, 1)]  # in its stored dtype: the crop converts only its own window to float32

    def crop(self, lms: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The training crop of a sample's log-mel (the short-clip rule of the run: padded, or tiled)."""
        return crop_clip(lms, self.frames, rng, self.repeat_short)[0]

    def leading_crops(self, seed: int) -> Iterator[np.ndarray]:
        """A random crop of each readable sample, in shard order from the first (statistics, monitor clips)."""
        frontend, rng = LogMelSpectrogram(self.sample_rate), np.random.default_rng(seed)
        for url in self.urls:
            try:
                for sample in fetch_samples(url):
                    try:
                        yield self.crop(self.log_mel(sample, frontend), rng)
                    except AudioReadError:
                        continue
            except DataError as e:  # a shard that cannot be fetched (404, a broken stream): the others go on, as in
                log.warning("%s; left out here, the other shards go on", e)  # training, where it is also listed


class LeadingClips:
    """The first `n` usable samples' crops held in memory, indexed like CropDataset (the monitors' fixed clips)."""

    def __init__(self, source: ShardSource, n: int, seed: int):
        self.crops = [torch.from_numpy(c).unsqueeze(0) for c in itertools.islice(source.leading_crops(seed), n)]
        if not self.crops:
            raise DataError(f"{source.urls[0]}: no readable sample for the monitors")

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key) -> dict:
        return {"lms": self.crops[key[0]]}


def shard_source(config) -> ShardSource:
    """The run's shards, with what this path does not do refused in one line (each has its own path elsewhere)."""
    d, o = config.data, config.offline
    unsupported = [k for k, on in (("data.loader=dali", d.loader == "dali"),
                                   ("offline.features (precomputed teacher features)", o.features is not None),
                                   ("offline.balanced (sampling by label)", o.task == "labels" and o.balanced)) if on]
    if unsupported:
        raise ConfigError(f"data.train={d.train}: streamed shards do not support {', '.join(unsupported)} yet; "
                          f"use a folder, CSV list or prepared store for those")
    if o.task == "labels" and not o.classes:
        raise ConfigError(f"data.train={d.train}: offline.task=labels from streamed shards reads each sample's "
                          f"labels from its JSON and needs the class list up front: set offline.classes=FILE")
    return open_shards(d.train, config, d.stats_items)


def open_shards(spec: str, config, stats_items: int) -> ShardSource:
    """Shards as a run with `config` reads them: its sample rate, crop, short-clip rule and seed."""
    d, frames = config.data, config.model.input_size[1]
    return ShardSource(spec, d.sample_rate, frames, 0 if d.repeat_short else pad_samples(d.sample_rate, frames),
                       stats_items, config.train.seed, d.repeat_short, d.shard_index, d.shard_samples)
