"""What every command that runs a model on audio files shares (`embed`, `tag`, `zeroshot`, `linear-eval`'s
embeddings): files decoded in DataLoader workers, clips of one length batched together (padding would change
their features), unreadable files reported and skipped. Device and arithmetic come from devices.py (`pick_device`,
`autocast`: bf16 where the hardware does it fast)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import AudioReadError
from ..frontend import read_audio


class _Decoded(Dataset):
    """Audio files decoded at the model's rate, in DataLoader workers: (index, waveform, None) or (index, None,
    the reason it cannot be read)."""

    def __init__(self, paths: List[Path], sample_rate: int):
        self.paths, self.sample_rate = paths, sample_rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, read_audio(self.paths[i], self.sample_rate), None
        except AudioReadError as e:
            return i, None, str(e)


def length_batches(paths: Sequence, sample_rate: int, batch_size: int, workers: int, on_error,
                   order: Optional[Sequence[int]] = None) -> Iterator[Tuple[List[int], torch.Tensor]]:
    """(indices, (B, N) waveforms) batches of clips of one length N, decoded in DataLoader workers; a clip that
    cannot be read goes to on_error(index, message). The clips of a length wait until their batch is full, the
    rest come at the end."""
    loader = DataLoader(_Decoded([Path(p) for p in paths], sample_rate), batch_size=None,
                        sampler=list(order) if order is not None else range(len(paths)), num_workers=workers)
    buckets: Dict[int, list] = {}
    for i, wav, error in loader:
        if error is not None:
            on_error(i, error)
            continue
        bucket = buckets.setdefault(wav.shape[-1], [])
        bucket.append((i, wav))
        if len(bucket) >= batch_size:
            del buckets[wav.shape[-1]]
            yield [j for j, _ in bucket], torch.stack([w for _, w in bucket])
    for bucket in buckets.values():
        yield [j for j, _ in bucket], torch.stack([w for _, w in bucket])
