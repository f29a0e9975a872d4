"""Training data streamed from tar shards in the webdataset layout, for machines that share no file system: local
paths, `http(s)://` URLs or `pipe:COMMAND` (e.g. `pipe:aws s3 cp s3://bucket/shard-000001.tar -`), brace-expanded
(`.../shard-{000000..000099}.tar`). The webdataset library reads the tar streams; fastm2d decodes each sample's
audio (its original bytes: WAV, FLAC, OGG, Opus, MP3, AIFF), applies the front end and the short-clip rule, and crops.

  write_shards(SRC, OUT)   `fastm2d prepare SRC --out OUT --format shards [--labels CSV]`: checked files ->
                           shard-NNNNNN.tar of their original bytes (no re-encoding) and a JSON member (name,
                           labels), failures.tsv, and shards.json (samples per shard); `--format logmel-shards`:
                           each file's log-mel as a store holds it instead (no decoding while training)
  ShardSource(spec)        the shard list and its sample counts (shards.json beside the shards); `norm_stats`
                           and the monitors' clips (LeadingClips) from the first samples
  ShardCrops               one rank's epoch, made by its loader workers: the shards are ordered by (seed, epoch) and
                           dealt to every (rank, worker) pair, so no two read the same shard; each worker makes a
                           fixed number of crops (its shards are read again if they hold fewer), handed over in
                           chunks, so every rank makes the same number of steps and none waits at a collective
  ShardBatches             the main process's side: the chunks in one canonical order, batches, stream positions
  local_copy(spec, cache)  shards fetched once into a machine's cache as files (background noise, read at random)

Resume is exact: ShardBatches keeps, per worker, where its current chunk starts in its stream (crops made, pass over
its shards, shard, samples read) and how many of its crops went into handed-out batches; every rank's goes into
the checkpoint. A resumed epoch skips the shards its workers finished without fetching them, reads past the used
samples of the shard each was in without decoding them, drops the used crops of the chunk it was in, and
continues with the very batches the uninterrupted run would have made (crop offsets and noise numbers are a
function of (seed, epoch, rank, worker, crop number); chunks are taken in (chunk, worker) order whatever order they
arrive in). Where the launch differs (another world size or data.num_workers), the interrupted epoch restarts
from its beginning instead, with a warning: its finished steps' samples are seen once more.
A sample that cannot be decoded (or has no usable labels or caption for its offline task) is logged, listed and
replaced by the next; a shard that cannot be fetched is retried (a stream broken midway goes on after the samples
already given), then listed and skipped (the worker reads its other shards again to keep the epoch's length).
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..atomic import atomic_file, open_append, write_atomic
from ..frontend import AudioReadError, LogMelSpectrogram, decode_audio, first_line
from .dataset import crop_clip, padded_lms
from .shard_counts import (TOO_LARGE, _shard_word, open_stream, sample_counts, shard_file_name, tar_samples,
                           webdataset_module)
from .sources import AUDIO_EXTS, DataError, sample_name
from .norm_stats_file import mean_std
from .store import item_span, warn_if_prepared_shorter

log = logging.getLogger("fastm2d.data")
MANIFEST = "shards.json"
AUDIO_KEYS = tuple(sorted(e.lstrip(".") for e in AUDIO_EXTS))  # a sample's audio member: what files may hold
POSITION_FIELDS = ("worker", "crops", "pass", "shard", "samples", "used")  # a chunk's start in its worker's epoch
# stream (crops made, pass over its shards, shard, samples read in it) and its crops already in finished steps
FETCH_TRIES = 3


def shard_urls(spec: str) -> List[str]:
    from braceexpand import braceexpand
    return list(braceexpand(str(spec)))


def manifest_address(first_shard: str) -> str:
    """Where shards.json is: beside the first shard, in the same transport (a path, a URL, or the same pipe command
    with the shard's file name replaced: `pipe:aws s3 cp s3://b/x/shard-000000.tar -` -> `... s3://b/x/shards.json
    -`)."""
    word = _shard_word(first_shard)
    if word is None:
        raise DataError(f"{first_shard}: a pipe: command with no .tar in it: cannot tell where {MANIFEST} is")
    folder = word[:len(word) - len(shard_file_name(first_shard))]
    return first_shard.replace(word, folder + MANIFEST, 1)


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
    from ..config import ConfigError
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
    from ..frontend import pad_samples
    d, frames = config.data, config.model.input_size[1]
    return ShardSource(spec, d.sample_rate, frames, 0 if d.repeat_short else pad_samples(d.sample_rate, frames),
                       stats_items, config.train.seed, d.repeat_short, d.shard_index, d.shard_samples)


def audio_key(sample: dict) -> Optional[str]:
    """The member of a sample that holds its audio (named by the file's suffix), or None."""
    return next((k for k in AUDIO_KEYS if k in sample), None)


def _samples(url: str) -> Iterator[dict]:
    return tar_samples(url)


def is_stream_position(obj) -> bool:
    """A checkpoint's `shard_position`: {'epoch': n, 'rows': [rank][worker] -> POSITION_FIELDS}, all counts >= 0."""
    def counts(row):
        return isinstance(row, list) and len(row) == len(POSITION_FIELDS) and \
            all(type(v) is int and v >= 0 for v in row)
    return isinstance(obj, dict) and type(obj.get("epoch")) is int and obj["epoch"] >= 0 and \
        isinstance(obj.get("rows"), list) and len(obj["rows"]) > 0 and \
        all(isinstance(r, list) and r and len(r) == len(obj["rows"][0]) and all(counts(w) for w in r)
            for r in obj["rows"])


def fetch_samples(url: str) -> Iterator[dict]:
    """A shard's samples, its stream opened again (up to FETCH_TRIES times) when it cannot be opened or breaks
    off; a retry goes on after the samples already given, never repeats them. DataError after the last try."""
    given = 0
    for attempt in range(FETCH_TRIES):
        try:
            for n, sample in enumerate(_samples(url)):
                if n >= given:
                    given += 1
                    yield sample
            return
        except Exception as e:  # noqa: BLE001 - network, pipe, tar: any failure of the transport
            reason = f"{url}: cannot be read ({first_line(e)})"
            if attempt + 1 < FETCH_TRIES:
                log.warning("%s; trying again", reason)
                time.sleep(0.5 * (attempt + 1))
    raise DataError(f"{reason} after {FETCH_TRIES} tries")


def local_copy(spec: str, cache: Path) -> Path:
    """The audio of every sample of the shards `spec` as files in a folder of `cache` (its original bytes), fetched
    once per machine and reused (`complete.json` marks a finished copy): a small set that every loader worker
    reads at random, such as M2D-X's background noise, from storage the nodes do not share."""
    import hashlib
    urls = shard_urls(spec)
    folder = Path(cache) / hashlib.sha256(str(spec).encode()).hexdigest()[:20]
    done = folder / "complete.json"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    files = 0
    for k, url in enumerate(urls):
        for sample in fetch_samples(url):
            key = audio_key(sample)
            if key is None:
                log.warning("skipping %s: no audio member", sample_name(sample))
                continue
            stem = str(sample['__key__']).replace('/', '_')
            if len(stem.encode()) > 120:  # a member name past what a file system takes (255 bytes): a digest of it
                stem = stem.encode()[:60].decode(errors="ignore") + "-" + hashlib.sha256(stem.encode()).hexdigest()[:16]
            name = f"{k:06d}-{stem}.{key}"
            write_atomic(folder / name, sample[key])
            files += 1
    write_atomic(done, json.dumps({"spec": str(spec), "shards": len(urls), "files": files}))
    log.info("%s: %d files copied to %s", spec, files, folder)
    return folder


def resume_start(saved: Optional[dict], epoch: int, used: int, rank: int, world: int,
                 workers: int) -> Optional[List[List[int]]]:
    """This rank's worker positions from a checkpoint's `shard_position`, where its epoch goes on exactly; None for
    a fresh epoch (`used` = 0 batches of it done), no saved position, or a launch of another shape (world size,
    loader workers), whose interrupted epoch then restarts from its beginning (said once, by rank 0)."""
    if used == 0 or saved is None:
        return None
    rows = saved["rows"]
    if saved["epoch"] == epoch and len(rows) == world and len(rows[rank]) == workers:
        return rows[rank]
    if rank == 0:
        log.warning("resuming mid-epoch with another world size or data.num_workers than the checkpoint's (%d x %d):"
                    " epoch %d of the shards restarts from its beginning", len(rows), len(rows[0]), epoch)
    return None


def deal_shards(n_shards: int, seed: int, epoch: int, rank: int, world: int, worker: int, workers: int) -> List[int]:
    """The shards one (rank, worker) reads in an epoch: a (seed, epoch) permutation dealt round-robin over all
    rank x worker pairs; disjoint, and together every shard."""
    order = np.random.default_rng([seed, epoch]).permutation(n_shards)
    return order[rank * workers + worker::world * workers].tolist()


def split_in_proportion(n: int, samples: List[int]) -> List[int]:
    """n split among workers in proportion to `samples` (largest remainders; equal shares when none)."""
    total = sum(samples)
    share = [n * s / total for s in samples] if total else [n / len(samples)] * len(samples)
    out = [int(x) for x in share]
    for i in sorted(range(len(share)), key=lambda i: share[i] - out[i], reverse=True)[:n - sum(out)]:
        out[i] += 1
    return out


CHUNK = 32  # crops a loader worker hands over at once: one transfer per chunk, not per crop (1.3-1.8x measured)


class ShardCrops(IterableDataset):
    """One epoch of one rank's crops, made by its loader workers in chunks of up to `chunk` crops:
    {'lms': (n, 1, F, T) raw log-mel, 'bg' (n, 1, F, T) noise and 'offline' (n, ...) targets when asked, 'keys',
    'skipped': samples skipped before them, 'chunk': (worker, chunk number), 'start' / 'end': the worker's stream
    position (crops, pass, shard, samples) before and after the chunk}. Worker w makes `quota(w)` crops in chunks
    at fixed boundaries (multiples of `chunk` from its first crop); ShardBatches puts them in one canonical order."""

    def __init__(self, source: ShardSource, epoch: int, seed: int, rank: int, world: int, batches: int,
                 batch_size: int, bad_list: Optional[Path] = None, start: Optional[List[List[int]]] = None,
                 background=None, targets=None, chunk: int = CHUNK):
        self.source, self.epoch, self.seed, self.chunk = source, epoch, seed, chunk
        self.rank, self.world, self.batches, self.batch_size = rank, world, batches, batch_size
        self.bad_list = bad_list
        self.start = start  # per worker, its POSITION_FIELDS in a checkpoint: where a resumed epoch goes on
        self.background = background  # noise.BackgroundCrops: sample number -> its noise crop (M2D-X)
        self.targets = targets  # (sample, seed) -> its offline target (ShardLabels, NamedCaptions), or None

    def plan(self, workers: int):
        """(shards dealt to each worker, crops each worker makes): `batches` x `batch_size` crops on every rank,
        shared among its workers in proportion to the samples their shards hold; a worker reads its shards again
        only when the whole rank holds fewer samples than its batches need."""
        n_shards = len(self.source.urls)
        if n_shards < self.world * workers:
            raise DataError(f"{n_shards} shards cannot give each of {self.world} ranks x {workers} loader workers "
                            f"its own: write more (smaller) shards or use fewer data.num_workers")
        dealt = [deal_shards(n_shards, self.seed, self.epoch, self.rank, self.world, w, workers)
                 for w in range(workers)]
        return dealt, split_in_proportion(self.batches * self.batch_size,
                                          [sum(self.source.counts[k] for k in d) for d in dealt])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        dealt, quotas = self.plan(workers)
        # The run's sample numbers (the noise stream keys on them): this worker's block of its rank's block
        first_number = (self.epoch * self.world + self.rank) * self.batches * self.batch_size + sum(quotas[:worker])
        begin = list(self.start[worker][1:5]) if self.start else [0, 0, 0, 0]
        chunk, position = [], begin
        for crop, after in self._crops(worker, dealt[worker], quotas[worker], begin, first_number):
            chunk.append(crop)
            position = after
            if after[0] % self.chunk == 0 or after[0] == quotas[worker]:
                yield self._chunk(chunk, worker, begin, position)
                chunk, begin = [], position

    def _chunk(self, crops: List[dict], worker: int, start: List[int], end: List[int]) -> dict:
        out = {k: torch.from_numpy(np.stack([c[k] for c in crops])) for k in ("lms", "bg", "offline") if k in crops[0]}
        return {**out, "keys": [c["key"] for c in crops], "skipped": sum(c["skipped"] for c in crops),
                "chunk": (worker, start[0] // self.chunk), "start": start, "end": end}

    def _crops(self, worker: int, mine: List[int], quota: int, begin: List[int], first_number: int):
        """(crop, stream position after it) for this worker, from `begin` (crops made, pass, shard, samples read
        in it): shards finished before it are not fetched, used samples are read past without decoding."""
        frontend = LogMelSpectrogram(self.source.sample_rate)
        made, resume_pass, resume_shard, resume_sample = begin
        skipped, dead, gave = 0, set(), made > 0
        for pass_ in itertools.count(resume_pass):
            if made >= quota:
                return
            for o, k in enumerate(mine):
                if k in dead or (pass_, o) < (resume_pass, resume_shard):
                    continue  # finished before the interruption: not fetched
                skip = resume_sample if (pass_, o) == (resume_pass, resume_shard) else 0
                for n, sample in enumerate(self._fetch(k, dead)):
                    if n < skip:
                        continue  # used before the interruption: read past, not decoded
                    rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, made])
                    try:
                        lms = self.source.crop(self.source.log_mel(sample, frontend), rng)
                        # a caption drawn by the crop's own seed (a label set ignores it)
                        target = self.targets(sample, int(rng.integers(2**62))) if self.targets is not None else None
                    except (AudioReadError, DataError) as e:
                        self._record(str(e))
                        skipped += 1
                        continue
                    crop = {"lms": lms[None], "key": sample["__key__"], "skipped": skipped}
                    if self.background is not None:
                        crop["bg"] = self.background(first_number + made)[None]
                    if target is not None:
                        crop["offline"] = target
                    made, gave, skipped = made + 1, True, 0
                    yield crop, [made, pass_, o, n + 1]
                    if made >= quota:
                        return
            if not gave:
                raise DataError(f"rank {self.rank} worker {worker}: none of its shards gave a usable sample "
                                f"(shards {[self.source.urls[k] for k in mine][:3]} ...)")
            gave = False

    def _fetch(self, k: int, dead: set) -> Iterator[dict]:
        """A shard's samples; one that cannot be read after FETCH_TRIES tries is listed and skipped for the epoch."""
        try:
            yield from fetch_samples(self.source.urls[k])
        except DataError as e:
            self._record(f"{e}: skipped for the rest of the epoch")
            dead.add(k)

    def _record(self, reason: str) -> None:
        log.warning("skipping: %s", reason)
        if self.bad_list is not None:
            with open_append(self.bad_list) as f:
                f.write(reason + "\n")


class ShardBatches:
    """The main process's side of ShardCrops: its loader workers' chunks in one canonical order, by (chunk number,
    worker) -- whatever order they arrive in, so a resumed epoch continues the uninterrupted one's batches --
    regrouped into batches of `batch_size`: dicts of 'lms' and, when made, 'bg' and 'offline'. `state` holds, per
    worker, POSITION_FIELDS: where its current chunk starts and how many of its crops went into batches already
    handed out (what a checkpoint records)."""

    def __init__(self, crops: ShardCrops, workers: int):
        self.crops, self.workers = crops, workers
        n = max(workers, 1)
        self.state = [list(row) for row in crops.start] if crops.start else [[w, 0, 0, 0, 0, 0] for w in range(n)]

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader
        n = max(self.workers, 1)
        _, quotas = self.crops.plan(n)
        size = self.crops.chunk
        chunks = [-(-q // size) for q in quotas]
        # the chunks still to come: a worker's position is the start of its current chunk (or its quota: done)
        order = sorted((c, w) for w in range(n)
                       for c in range(self.state[w][1] // size if self.state[w][1] < quotas[w] else chunks[w],
                                      chunks[w]))
        arrived, loader = {}, iter(DataLoader(self.crops, batch_size=None, num_workers=self.workers))
        pieces, have = [], 0  # (chunk, first crop, end) of the batch being filled
        for c, w in order:
            while (w, c) not in arrived:
                chunk = next(loader, None)
                if chunk is None:  # a worker makes exactly its quota (or raises): this would be a bug here
                    raise DataError(f"rank {self.crops.rank}: the loader workers ended before chunk {c} of worker {w}")
                arrived[tuple(chunk["chunk"])] = chunk
            chunk = arrived.pop((w, c))
            first = self.state[w][5] if self.state[w][1] == chunk["start"][0] else 0  # the resumed chunk's used crops
            n_crops = len(chunk["keys"])
            while first < n_crops:
                take = min(n_crops - first, self.crops.batch_size - have)
                pieces.append((chunk, first, first + take))
                have, first = have + take, first + take
                if have == self.crops.batch_size:
                    yield self._batch(pieces)
                    pieces, have = [], 0

    def _batch(self, pieces) -> dict:
        """A batch from its pieces of chunks; the workers' positions advanced past them."""
        for chunk, _, stop in pieces:
            w = chunk["chunk"][0]
            done = stop == len(chunk["keys"])
            self.state[w] = [w, *(chunk["end"] if done else chunk["start"]), 0 if done else stop]
        return {k: torch.cat([chunk[k][a:b] for chunk, a, b in pieces]) for k in ("lms", "bg", "offline")
                if k in pieces[0][0]} | {"keys": [key for chunk, a, b in pieces for key in chunk["keys"][a:b]],
                                        "skipped": sum(chunk["skipped"] for chunk, a, _ in pieces if a == 0)}


def write_shards(src: str, out: str | Path, files_per_shard: int = 1000, root: Optional[str] = None,
                 progress: bool = True, min_seconds: float = 0.16, labels: Optional[str] = None,
                 logmel: Optional[dict] = None, workers: Optional[int] = None) -> dict:
    """`fastm2d prepare SRC --out OUT --format shards`: each checked file's original bytes into shard-NNNNNN.tar
    (key = its index, member <key>.<its suffix>, and <key>.json naming the source file and, from a `labels` CSV,
    its labels), every shard written atomically; unusable files in failures.tsv with the reason (the store's
    listing); shards.json last. A file with no row in `labels` is refused before anything is written.

    `logmel` ({sample_rate, crop_frames, dtype, min_patch_frames}: `--format logmel-shards`): each sample is instead
    the log-mel a prepared store holds for the file (`<key>.npy`, (F, T), short clips padded by frontend.py's rule
    for the longest crop, its own audio frames in the JSON), made by `workers` processes: no decoding while
    training, and smaller than 16-bit audio at 16 kHz."""
    TarWriter = webdataset_module().TarWriter
    from ..folder_lock import RunLock
    from .file_checks import check_files_once
    from .offline_targets import read_label_rows
    from .sources import list_file_names
    out = Path(out)
    with RunLock(out):
        files, bad = check_files_once(list_file_names(src, root), min_seconds=min_seconds, progress=progress)
        names = [str(f) for f in files]
        label_rows = read_label_rows(Path(labels), Path(root) if root else None) if labels else {}
        unlabelled = [n for n in names if labels and Path(n).resolve() not in label_rows]
        if unlabelled:
            raise DataError(f"--labels {labels}: no row for {len(unlabelled)} of the files, e.g. {unlabelled[0]}")
        failures = [(str(b.path), b.reason) for b in bad]
        shards: List[Dict] = []
        chunks = [(s, lo, names[lo:lo + files_per_shard]) for s, lo in enumerate(range(0, len(names), files_per_shard))]
        for s, lo, members in _shard_members(chunks, logmel, workers):
            name = f"shard-{s:06d}.tar"
            kept = 0
            with atomic_file(out / name) as f:
                with TarWriter(f) as w:
                    for i, path, content, extra in members:
                        if isinstance(content, str):  # the reason it could not be prepared
                            failures.append((path, content))
                            continue
                        meta = {"name": path, **extra,
                                **({"labels": label_rows[Path(path).resolve()]} if labels else {})}
                        w.write({"__key__": f"{i:09d}", **content, "json": json.dumps(meta).encode()})
                        kept += 1
            shards.append({"file": name, "samples": kept})
        write_atomic(out / "failures.tsv", "path\treason\n" + "".join(
            f"{json.dumps(p)}\t{json.dumps(r)}\n" for p, r in failures))
        samples = sum(x["samples"] for x in shards)
        about = {"format": "fastm2d-logmel-shards", **_logmel_about(logmel)} if logmel else \
            {"format": "fastm2d-audio-shards"}
        write_atomic(out / MANIFEST, json.dumps({**about, "shards": shards, "samples": samples,
                                                 "failures": len(failures)}, indent=1))
    return {"shards": len(shards), "samples": samples, "failures": len(failures)}


def _logmel_about(logmel: dict) -> dict:
    from ..frontend import N_MELS
    from .logmel_items import frontend_record
    return {"dtype": logmel["dtype"], "max_crop_frames": logmel["crop_frames"], "n_mels": N_MELS,
            "frontend": frontend_record(logmel["sample_rate"])}


def _shard_members(chunks, logmel: Optional[dict], workers: Optional[int]):
    """(shard number, first index, [(index, path, {member: bytes} or the reason it failed, JSON extras)]) per shard,
    in order: the files' bytes, or (logmel) their log-mel made by a pool of processes."""
    if not logmel:
        for s, lo, paths in chunks:
            yield s, lo, [(i, p, {Path(p).suffix.lower().lstrip("."): Path(p).read_bytes()}, {})
                          for i, p in enumerate(paths, start=lo)]
        return
    import os
    from .logmel_items import frontend_record, in_processes
    frontend_record(logmel["sample_rate"])  # an unknown rate: one line before any file is read
    tasks = [(s, lo, paths, logmel) for s, lo, paths in chunks]
    workers = (os.cpu_count() or 1) if workers is None else workers
    # in order: shard s is written while the pool makes s+1 ...; a single shard is made here
    yield from in_processes(_logmel_members, tasks, workers if len(tasks) > 1 else 0, ordered=True)


def _logmel_members(task):
    """One shard's files -> their log-mel as .npy bytes (the store's per-item rule, logmel_items.item_lms)."""
    from ..frontend import LogMelSpectrogram, pad_samples
    from .logmel_items import item_lms
    s, lo, paths, logmel = task
    torch.set_num_threads(1)
    frontend = LogMelSpectrogram(logmel["sample_rate"])
    pad_to = pad_samples(logmel["sample_rate"], logmel["crop_frames"])
    members = []
    for i, path in enumerate(paths, start=lo):
        try:
            lms, audio_frames = item_lms(Path(path), frontend, pad_to, logmel["min_patch_frames"])
        except Exception as e:  # noqa: BLE001 - every failure is listed with its reason, never fatal
            members.append((i, path, str(e).replace(f"{path}: ", ""), {}))
            continue
        buf = io.BytesIO()
        np.save(buf, lms.astype(logmel["dtype"]), allow_pickle=False)
        members.append((i, path, {"npy": buf.getvalue()}, {"audio_frames": int(audio_frames)}))
    return s, lo, members
