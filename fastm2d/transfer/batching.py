"""What everything that runs a model on many clips shares (`embed`, `tag`, `zeroshot`, `linear-eval`'s embeddings,
the training monitors): clips loaded or decoded in DataLoader workers, clips of one length batched together
(padding would change their features), unreadable files reported and skipped. Device and arithmetic come from devices.py (`pick_device`,
`autocast`: bf16 where the hardware does it fast)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import AudioReadError
from ..frontend import read_audio


class _Loaded(Dataset):
    """Items loaded by `load(i)` (in DataLoader workers when there are any): (index, array, None) or (index, None,
    the reason it cannot be read). Arrays, not tensors: a worker pickles them through its pipe, where a tensor
    would go through a shared-memory file, and a hand-over that fails there (a small /dev/shm, a file-size limit)
    is never reported by PyTorch: the command waited for the item until killed."""

    def __init__(self, n: int, load: Callable[[int], torch.Tensor]):
        self.n, self.load = n, load

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            return i, self.load(i).numpy(), None
        except AudioReadError as e:
            return i, None, str(e)


def _as_is(item):
    return item


class _ReadAudio:
    """load(i) for a list of audio files: the i-th decoded at the model's rate (picklable for the workers)."""

    def __init__(self, paths: Sequence, sample_rate: int):
        self.paths, self.sample_rate = [Path(p) for p in paths], sample_rate

    def __call__(self, i: int) -> torch.Tensor:
        return read_audio(self.paths[i], self.sample_rate)


def batches_by_length(n: int, load: Callable[[int], torch.Tensor], batch_size: int, workers: int = 0,
                      on_error: Optional[Callable[[int, str], None]] = None,
                      order: Optional[Sequence[int]] = None) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """(indices, stacked items) batches of items of one shape, `load(i)` run in DataLoader workers; an item that
    cannot be read (AudioReadError) goes to on_error(index, message), or is raised without one. The items of a
    shape wait until their batch is full, the rest come at the end."""
    loader = DataLoader(_Loaded(n, load), batch_size=None, num_workers=workers, collate_fn=_as_is,
                        sampler=list(order) if order is not None else range(n))
    buckets: Dict[tuple, list] = {}
    for i, array, error in loader:
        if error is not None:
            if on_error is None:
                raise AudioReadError(error)
            on_error(i, error)
            continue
        x = torch.from_numpy(array)
        bucket = buckets.setdefault(tuple(x.shape), [])
        bucket.append((i, x))
        if len(bucket) >= batch_size:
            del buckets[tuple(x.shape)]
            yield [j for j, _ in bucket], torch.stack([w for _, w in bucket])
    for bucket in buckets.values():
        yield [j for j, _ in bucket], torch.stack([w for _, w in bucket])


def length_batches(paths: Sequence, sample_rate: int, batch_size: int, workers: int, on_error,
                   order: Optional[Sequence[int]] = None) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """(indices, (B, N) waveforms) batches of audio files of one length N, decoded in DataLoader workers at
    `sample_rate`; a file that cannot be read goes to on_error(index, message)."""
    return batches_by_length(len(paths), _ReadAudio(paths, sample_rate), batch_size, workers, on_error, order)
