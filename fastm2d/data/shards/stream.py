"""One rank's epoch of crops from its shards, made by its loader workers, and its exact resume position.

The shards are ordered by (seed, epoch) and dealt to every (rank, worker) pair, so no two read the same shard; each
worker makes a fixed number of crops (its shards are read again if they hold fewer), handed over in chunks, so every
rank makes the same number of steps and none waits at a collective. ShardBatches, the main process's side, takes
the chunks in one canonical order and keeps each worker's stream position (what a checkpoint records)."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ...atomic import open_append
from ...frontend import AudioReadError, LogMelSpectrogram
from ..sources import DataError
from .fetching import fetch_samples
from .source import ShardSource

log = logging.getLogger("fastm2d.data")
POSITION_FIELDS = ("worker", "crops", "pass", "shard", "samples", "used")  # a chunk's start in its worker's epoch
# stream (crops made, pass over its shards, shard, samples read in it) and its crops already in finished steps


def is_stream_position(obj) -> bool:
    """A checkpoint's `shard_position`: {'epoch': n, 'rows': [rank][worker] -> POSITION_FIELDS}, all counts >= 0."""
    def counts(row):
        return isinstance(row, list) and len(row) == len(POSITION_FIELDS) and \
            all(type(v) is int and v >= 0 for v in row)
    return isinstance(obj, dict) and type(obj.get("epoch")) is int and obj["epoch"] >= 0 and \
        isinstance(obj.get("rows"), list) and len(obj["rows"]) > 0 and \
        all(isinstance(r, list) and r and len(r) == len(obj["rows"][0]) and all(counts(w) for w in r)
            for r in obj["rows"])


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
