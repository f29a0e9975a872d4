"""Opening what a run trains on: the embedded synthetic set, a prepared store, or a folder / CSV of files checked
before training (in parallel, once per data set, the first rank of each node checking while the others wait).
The training data, the background noise and the validation data of a run all open here, in one way."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from ..config import Config, ConfigError, is_shard_spec
from ..atomic import write_atomic
from ..distributed import node_first
from ..frontend import min_real_samples, pad_samples
from .dataset import FOUND_WHILE_TRAINING, LogMelSource
from .file_checks import check_files_once
from .sources import list_file_names, require_usable
from .store import LogMelStore, is_store
from ..run_folder import RunFolder
from ..user_cache import user_cache
from .shards import local_copy


def open_source(spec: str, config: Config, run: RunFolder, root: Optional[str] = None, label: str = "training",
                 seed_offset: int = 0):
    """The embedded synthetic set, a prepared LogMelStore folder, or a folder / CSV of files (checked first).

    Short training clips follow frontend.py's rule (waveform zero-padded to the crop, or tiled with
    data.repeat_short); background noise is never padded (it is tiled). Streamed shards given for noise or
    validation are copied to the machine first (training data given as shards streams: data/shards/).
    """
    d, frames = config.data, config.model.input_size[1]
    tiled = label == "noise" or d.repeat_short
    if is_shard_spec(spec):  # noise or validation clips, read at random: a copy on this machine (training streams)
        spec = str(node_local_copy(spec))
    if is_store(spec):
        store = LogMelStore(spec, crop_frames=frames, repeat_short=tiled)
        if store.sample_rate != d.sample_rate:
            raise ConfigError(f"data.sample_rate={d.sample_rate}, but {spec} was prepared at {store.sample_rate} Hz")
        return store
    if spec == "synthetic":
        return LogMelSource(sample_rate=d.sample_rate, synthetic=(config.train.seed + seed_offset, d.synthetic_clips,
                                                                   d.synthetic_seconds),
                            pad_to=0 if tiled else pad_samples(d.sample_rate, frames))
    source, bad = file_source(spec, config, root, pad=not tiled, cache_dir=check_cache_dir(config, run.path))
    listing = run.bad_files(label)
    if bad:  # the header checks' list, keeping what earlier runs of this folder found while training
        found = _found_while_training(listing, set(source.files.names()))
        write_atomic(listing, "".join(f"{b}\n" for b in bad) + "".join(found))
    require_usable(source.files, bad, d.on_bad_file, label, listing)
    return source


def node_local_copy(spec: str) -> Path:
    """Streamed shards as files in this machine's cache (data/shards/fetching.py local_copy): the node's first rank copies
    while the others wait."""
    return node_first(lambda: local_copy(spec, user_cache("shard_copies")))


def _found_while_training(listing: Path, files: set) -> List[str]:
    """Lines of an existing bad-file list that training appended (CropDataset), for files still in the list."""
    if not listing.is_file():
        return []
    return [line for line in listing.read_text().splitlines(keepends=True)
            if line.endswith(FOUND_WHILE_TRAINING + "\n") and line.split(": ", 1)[0] in files]


def check_cache_dir(config: Config, out_dir: Path) -> Path:
    """Where a run keeps and finds its lists' file checks: shared by every run (data.check_cache, default the user
    cache) or this run's folder (data.check_cache=run)."""
    where = config.data.check_cache
    if where == "run":
        return Path(out_dir)
    return Path(where) if where else user_cache("file_checks")


def file_source(spec: str, config: Config, root: Optional[str] = None, pad: bool = True,
                cache_dir: Optional[Path] = None):
    """A folder / CSV of files, header-checked -> (LogMelSource of the usable ones, the unusable with reasons).
    Usable = at least one patch width of audio; `pad` applies frontend.py's short-clip rule for the crop.

    The checks run in parallel and, with a cache_dir (the run folder), once per data set: saved there and reused
    by --resume and restarts; under several processes the first rank of each node checks while the others wait
    at a barrier, then read its result."""
    d, patch_t = config.data, config.model.patch_size[1]
    min_samples = min_real_samples(d.sample_rate, patch_t)
    check = dict(n_mels=config.model.input_size[0], min_seconds=min_samples / d.sample_rate, min_frames=patch_t,
                 cache_dir=cache_dir, progress=config.train.progress)
    paths = list_file_names(spec, root)
    files, bad = node_first(lambda: check_files_once(paths, **check),
                            lambda: check_files_once(paths, **check, reuse_only=True), together=cache_dir is not None)
    return LogMelSource(files, sample_rate=d.sample_rate,
                        pad_to=pad_samples(d.sample_rate, config.model.input_size[1]) if pad else 0,
                        min_samples=min_samples, min_frames=patch_t), bad
